"""Every notebook in nbs/ runs top to bottom (walkthroughs in quick mode), and the committed library equals
what `nbdev_export` makes of the notebooks.

Each notebook runs in a fresh Jupyter kernel through `medssm.docs.execute_notebook`, with nbdev's test rules
(`#| notest` and `#| eval: false` cells and `nbdev_export()` calls are skipped; `IN_TEST=1`, `MEDSSM_QUICK=1`).
The result is remembered for the rest of the pytest process, so the docs-site build of tests/test_docs_browser.py
(which runs first) and these tests share one execution per notebook."""
import filecmp, os, shutil, subprocess, sys
from pathlib import Path

import pytest
from medssm.docs import execute_notebook, NotebookError

ROOT = Path(__file__).resolve().parents[1]
CELL_TIMEOUT = 600   # seconds a single cell may take before the kernel is stopped (a hang fails, never blocks CI)
NOTEBOOKS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_'))


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb):
    try: execute_notebook(nb, quick=True, skip_flags=('notest',), timeout=CELL_TIMEOUT)
    except NotebookError as e: pytest.fail(str(e), pytrace=False)   # the failing cell and its traceback


def test_export_matches_notebooks(tmp_path):
    "Run nbdev_export on a copy of the notebooks and compare with the committed medssm/."
    work = tmp_path/'repo'
    shutil.copytree(ROOT/'nbs', work/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_proc', '_docs'))
    shutil.copy(ROOT/'settings.ini', work/'settings.ini')
    (work/'medssm').mkdir(); shutil.copy(ROOT/'medssm'/'__init__.py', work/'medssm'/'__init__.py')
    exe = Path(sys.executable).with_name('nbdev_export')
    env = {k: v for k, v in os.environ.items() if k != 'IN_TEST'}   # nbdev's test runner sets IN_TEST, which disables export
    out = subprocess.run([str(exe)], cwd=work, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    made = {p.relative_to(work/'medssm') for p in (work/'medssm').rglob('*.py')}
    have = {p.relative_to(ROOT/'medssm') for p in (ROOT/'medssm').rglob('*.py') if '__pycache__' not in p.parts}
    assert made == have, f'modules differ: only exported {sorted(map(str, made - have))}, only committed {sorted(map(str, have - made))}'
    differ = [str(p) for p in sorted(made) if not filecmp.cmp(work/'medssm'/p, ROOT/'medssm'/p, shallow=False)]
    assert not differ, f'medssm/ differs from nbdev_export output in {differ}: run nbdev_export and commit'
