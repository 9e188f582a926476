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




def test_committed_notebooks_are_in_canonical_form():
    "Every notebook is stored as the Jupyter pre-save hook and the git filter write it (no outputs, ids or metadata)."
    from medssm.tools.docs import clean_notebook
    unclean = [p.name for p in NOTEBOOKS if clean_notebook(p.read_text(encoding='utf-8')) != p.read_text(encoding='utf-8')]
    assert not unclean, f'run `medssm docs clean` on: {unclean}'


def test_a_run_notebook_leaves_git_status_clean(tmp_path):
    """A walkthrough run and saved from JupyterLab (the server's contents manager, with the pre-save hook that
    `medssm docs hooks` installs) leaves `git status` clean; without the hook the same save would show a change."""
    import json
    from jupyter_server.services.contents.filemanager import FileContentsManager
    from medssm.tools.docs import execute_notebook, jupyter_pre_save
    stem = '02_metrics'                                    # runs in seconds and displays tables
    ran = execute_notebook(ROOT/'nbs'/f'{stem}.ipynb', quick=True).nb
    assert any(c.get('outputs') for c in ran.cells if c.cell_type == 'code')
    clone = tmp_path/'clone'
    git = lambda *a: subprocess.run(['git', '-C', str(clone), *a], check=True, capture_output=True, text=True).stdout
    subprocess.run(['git', 'clone', '-q', str(ROOT), str(clone)], check=True)
    git('config', 'user.email', 't@example.org'); git('config', 'user.name', 't')
    for rel in ('.gitattributes', '.gitconfig', 'settings.ini', f'nbs/{stem}.ipynb'):   # as they are now, committed in the clone
        if (ROOT/rel).exists(): shutil.copy(ROOT/rel, clone/rel)
    git('add', '-A'); git('commit', '-q', '--allow-empty', '-m', 'now')
    def save(hook):
        cm = FileContentsManager(root_dir=str(clone), **({'pre_save_hook': hook} if hook else {}))
        model = cm.get(f'nbs/{stem}.ipynb')                                    # JupyterLab opens it …
        model['content'] = json.loads(json.dumps(ran))                         # … runs every cell …
        cm.save({'type': 'notebook', 'format': 'json', 'content': model['content']}, f'nbs/{stem}.ipynb')   # … saves
    save(jupyter_pre_save)
    assert git('status', '--porcelain') == ''
    save(None)
    assert git('status', '--porcelain') != ''             # without the hook the outputs would be a change
