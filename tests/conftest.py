import os
# Notebooks and demos run at test size; keep CPU runs deterministic and light on the 2-core CI machine.
os.environ.setdefault('MEDSSM_QUICK', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
if os.environ.get('PYTEST_XDIST_WORKER'):
    # one BLAS/OpenMP thread per test worker: the workers already use every core
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    os.environ.setdefault('MKL_NUM_THREADS', '1')

import re, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT/'tests'/'_out'
SITE, NBEXEC = OUT/'docs_site', OUT/'nbexec'
BUILD_LIMIT = int(os.environ.get('MEDSSM_BUILD_LIMIT', 2400))   # seconds for one `medssm docs build` process
CELL_LIMIT = int(os.environ.get('MEDSSM_CELL_LIMIT', 600))      # seconds for one cell (a hung kernel ends there)


@pytest.fixture(scope='module')   # per module: Playwright's loop must not outlive the module that uses it
def browser():
    "Headless Debian chromium driven by Playwright for the browser tests; fails (never skips) when missing."
    from medssm.tools.docs import launch_chromium, sync_playwright, BrowserMissing
    try: manager, missing = sync_playwright(), None
    except BrowserMissing as e: missing = str(e)
    if missing:
        pytest.fail(f'{missing}; install them (apt-get install -y chromium; pip install playwright) or skip the '
                    'browser tests explicitly with: python -m pytest tests -m "not browser"', pytrace=False)
    with manager as pw:
        b = launch_chromium(pw)
        yield b
        b.close()


_PROGRESS = re.compile(r'^(FAILED )?(\S+)\.ipynb: [0-9.]+ s')

def _build(stems:list[str])->tuple[dict[str, str|None], str]:
    "One `medssm docs build` process over `stems`; returns ({stem: None (ok) or error}, its log). Killed at BUILD_LIMIT."
    exe = Path(sys.executable).with_name('medssm')
    proc = subprocess.Popen([str(exe), 'docs', 'build', '--out', str(SITE), '--nbs', str(ROOT/'nbs'), '--cache',
                             str(NBEXEC), '--timeout', str(CELL_LIMIT), '--only', *stems],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try: log, _ = proc.communicate(timeout=BUILD_LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)          # the kernels go with the process group
        log = proc.communicate()[0] + f'\n(killed after {BUILD_LIMIT} s)'
    done = {m[2]: m[1] for m in map(_PROGRESS.match, log.splitlines()) if m}
    results = {}
    for stem, failed in done.items():
        block = re.search(rf'^FAILED {re.escape(stem)}\.ipynb:\n((?:    .*\n?|\n)+)', log, re.M)
        results[stem] = (block[1] if block else log[-3000:]) if failed else None
    return results, log


@pytest.fixture(scope='session')
def executed_notebooks(request)->dict[str, str|None]:
    """Every notebook this session needs, executed once in a real kernel (quick mode, `#| notest` cells skipped) by
    `medssm docs build`, which also renders its page into tests/_out/docs_site. Returns {stem: None if it ran, else
    the failing cell and traceback}.

    Notebooks run in one build process (a process per notebook cost ~10 s of start-up each); a process that hangs is
    killed at BUILD_LIMIT and a notebook that failed or got no result is tried again (a kernel was seen to hang now
    and then), up to three attempts. Shared by tests/test_notebooks.py and the docs-site tests."""
    from medssm.tools.docs import list_notebooks
    every = [p.stem for p in list_notebooks(ROOT/'nbs')]
    wanted = set()
    for item in request.session.items:
        if 'executed_notebooks' not in getattr(item, 'fixturenames', ()): continue
        nb = getattr(item, 'callspec', None) and item.callspec.params.get('nb')
        if nb is None: wanted = set(every); break          # the site tests need every page
        wanted.add(Path(nb).stem)
    # MEDSSM_REUSE_NBEXEC=1 (local iteration): keep executed notebooks whose source and library are unchanged
    for d in (SITE,) if os.environ.get('MEDSSM_REUSE_NBEXEC') else (SITE, NBEXEC): shutil.rmtree(d, ignore_errors=True)
    results, t0 = {}, time.time()
    todo = [s for s in every if s in wanted]
    for attempt in range(3):
        if not todo: break
        got, log = _build(todo)
        results.update(got)
        missing = [s for s in todo if s not in got]
        for s in missing: results[s] = f'no result from the build (attempt {attempt + 1}):\n{log[-3000:]}'
        todo = [s for s in todo if results[s] is not None]
        if todo: print(f'docs build attempt {attempt + 1}: retrying {todo}', flush=True)
    print(f'{len(results)} notebooks executed in {time.time() - t0:.0f} s', flush=True)
    return results


@pytest.fixture(scope='session')
def docs_site(executed_notebooks)->Path:
    "The folder of the offline site that `executed_notebooks` rendered (every page, failed notebooks included)."
    return SITE
