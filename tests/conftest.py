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


import pytest


@pytest.fixture(scope='module')   # per module: Playwright's loop must not outlive the module that uses it
def browser():
    "Headless Debian chromium driven by Playwright for the browser tests; fails (never skips) when missing."
    from medssm.docs import launch_chromium, sync_playwright, BrowserMissing
    try: manager, missing = sync_playwright(), None
    except BrowserMissing as e: missing = str(e)
    if missing:
        pytest.fail(f'{missing}; install them (apt-get install -y chromium; pip install playwright) or skip the '
                    'browser tests explicitly with: python -m pytest tests -m "not browser"', pytrace=False)
    with manager as pw:
        b = launch_chromium(pw)
        yield b
        b.close()
