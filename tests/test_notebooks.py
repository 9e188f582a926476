"""Every notebook in nbs/ runs top to bottom (walkthroughs in quick mode), and the committed library equals
what `nbdev_export` makes of the notebooks.

Each notebook is executed once per test session in a real Jupyter kernel, as nbdev's test runner would (`#| notest`
cells skipped, `IN_TEST=1`, `MEDSSM_QUICK=1`), by the docs build in tests/conftest.py (`executed_notebooks`); the docs
site tests show the same executed notebooks. A kernel per notebook keeps one notebook's definitions (a re-registered
command, a class defined in `__main__`) out of every other test."""
import filecmp, os, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_'))


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb, executed_notebooks):
    error = executed_notebooks[nb.stem]
    assert error is None, f'{nb.name} failed:\n{error}'


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
