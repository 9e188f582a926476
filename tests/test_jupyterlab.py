"""The JupyterLab experience in a real browser: `jupyter lab` on 127.0.0.1 (free port, no token, --allow-root),
each walkthrough notebook (nbs/x9_*.ipynb, found by glob) plus the engine's widget notebook opened in headless
chromium, all its cells run in quick mode (MEDSSM_QUICK=1 in the server's environment): no cell fails, the widgets
render, and moving a control (dropdown, toggle buttons, checkbox or slider) of a widget changes that widget's output (a browser →
kernel → browser round trip).

The server serves a temporary copy of nbs/ (so nothing is ever saved into the repository) in which the cells the
test-suite skips (`#| notest`, full-size runs) are turned into raw cells. It is always stopped by its PID.
Screenshots: tests/_out/jupyterlab/<notebook>.png (the notebook at the widget) and <notebook>_widget.png (the widget),
both after the control change.
Needs chromium + playwright; without them these tests FAIL (skip explicitly with `-m "not browser"`)."""
import json, os, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import nbformat
import pytest
from medssm.tools.docs import kernel_env, read_notebook, is_skipped

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT/'tests'/'_out'/'jupyterlab'
WALKTHROUGHS = sorted((ROOT/'nbs').glob('[0-9]9_*.ipynb'))
NOTEBOOKS = [ROOT/'nbs'/'04_widgets.ipynb'] + WALKTHROUGHS     # 04_widgets: the engine's viewers, always present
RUN_TIMEOUT = int(os.environ.get('MEDSSM_LAB_TIMEOUT', 900))  # seconds for one notebook's "Run All" in quick mode
SETTINGS = {   # JupyterLab user settings: never autosave, render every cell (no virtual scrolling), no news fetches
    '@jupyterlab/docmanager-extension/plugin.jupyterlab-settings': {'autosave': False},
    '@jupyterlab/notebook-extension/tracker.jupyterlab-settings': {'windowingMode': 'none'},
    '@jupyterlab/apputils-extension/notification.jupyterlab-settings': {'fetchNews': 'false', 'checkForUpdates': False},
}


def _free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _workspace(tmp:Path)->Path:
    "A copy of the repository's layout for the server: nbs/ copied (skipped cells → raw), the rest symlinked."
    root = tmp/'root'; root.mkdir()
    for p in ROOT.iterdir():
        if p.name not in ('nbs', '.git', '.venv', 'tests'): (root/p.name).symlink_to(p)
    (root/'nbs').mkdir()
    for p in (ROOT/'nbs').iterdir():
        if p.suffix != '.ipynb': (root/'nbs'/p.name).symlink_to(p); continue
        nb = read_notebook(p)
        for i, c in enumerate(nb.cells):
            if is_skipped(c): nb.cells[i] = nbformat.v4.new_raw_cell('# skipped by the tests (#| notest)\n' + c.source)
        nbformat.write(nb, root/'nbs'/p.name)
    settings = tmp/'settings'
    for rel, val in SETTINGS.items():
        (settings/rel).parent.mkdir(parents=True, exist_ok=True); (settings/rel).write_text(json.dumps(val))
    return root


@pytest.fixture(scope='module')
def lab(browser, tmp_path_factory):
    "A JupyterLab server on a free port; yields its base URL; always stopped by PID."
    tmp = tmp_path_factory.mktemp('lab')
    root, port = _workspace(tmp), _free_port()
    shutil.rmtree(OUT, ignore_errors=True); OUT.mkdir(parents=True)
    env = dict(kernel_env(quick=True), JUPYTER_CONFIG_DIR=str(tmp/'config'), JUPYTER_RUNTIME_DIR=str(tmp/'runtime'))
    cmd = [str(Path(sys.executable).with_name('jupyter-lab')), '--no-browser', '--allow-root', '--ip=127.0.0.1',
           f'--port={port}', '--IdentityProvider.token=', '--ServerApp.password=', f'--ServerApp.root_dir={root}',
           f'--LabApp.user_settings_dir={tmp/"settings"}', f'--LabApp.workspaces_dir={tmp/"workspaces"}',
           '--ServerApp.open_browser=False']
    log = open(OUT/'server.log', 'w')
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f'http://127.0.0.1:{port}/'
    def on_sigterm(*_): raise KeyboardInterrupt('SIGTERM')   # so the teardown below still stops the server
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None: pytest.fail(f'jupyter lab exited with {proc.returncode}: see {OUT/"server.log"}')
            try:
                with urllib.request.urlopen(url + 'api/status', timeout=2) as r:
                    if r.status == 200: break
            except OSError: pass
            if time.time() > deadline: pytest.fail(f'jupyter lab did not answer in 120 s: see {OUT/"server.log"}')
            time.sleep(0.5)
        yield url
    finally:
        _shutdown_kernels(url)                  # the kernels through the API, then the server by its PID
        os.kill(proc.pid, signal.SIGTERM)
        try: proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL); proc.wait(timeout=10)
        log.close()
        signal.signal(signal.SIGTERM, previous)


def _prompts(page)->list[str]:
    return page.eval_on_selector_all('.jp-CodeCell .jp-InputArea-prompt', 'els => els.map(e => e.textContent.trim())')


def _run_all(page, timeout=RUN_TIMEOUT):
    "Run > Run All Cells, then wait until every code cell has an execution count; fail on the first error."
    page.locator('.lm-MenuBar-itemLabel', has_text='Run').first.click()
    page.locator('.lm-Menu-itemLabel', has_text='Run All Cells').first.click()
    t0, started = time.time(), False
    while time.time() - t0 < timeout:
        p = _prompts(page)
        started = started or any(x != '[ ]:' for x in p)
        if started and p and all(x[1:-2].strip().isdigit() for x in p): return time.time() - t0
        if started and '[*]:' not in p:         # the queue stopped before the end: a cell raised
            errs = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
            raise AssertionError('a cell failed:\n' + '\n'.join(errs.all_inner_texts())[-3000:])
        page.wait_for_timeout(500)
    raise AssertionError(f'cells still running after {timeout} s: {_prompts(page)}')


OUTPUTS = '.widget-output, .widget-html-content, .widget-image, .js-plotly-plot'   # where a widget shows its results
CONTROLS = {'dropdown': '.widget-dropdown select', 'toggle buttons': '.widget-toggle-button',
            'checkbox': '.widget-checkbox input', 'slider': '.noUi-handle'}      # tried in this order


def _signature(widget)->str:
    "What the widget's output parts show (image sources, plot images, text), to detect a change."
    return widget.evaluate(f"""el => [...el.querySelectorAll('{OUTPUTS}')].map(o => o.textContent +
        [...o.querySelectorAll('img, image')].map(i => i.src || i.getAttribute('href') || '').join(',')).join('|')""")


def _move(page, box)->str:
    "Change the box's first control (by the order of CONTROLS); returns the kind of control."
    kind = next(k for k, sel in CONTROLS.items() if box.locator(sel).count())
    control = box.locator(CONTROLS[kind]).first
    if kind == 'dropdown':
        options = control.locator('option').all_inner_texts()
        current = options.index(control.evaluate('s => s.options[s.selectedIndex].text'))
        control.select_option(index=(current + 1) % len(options))
    elif kind == 'toggle buttons':
        box.locator(CONTROLS[kind] + ':not(.mod-active)').first.click()
    elif kind == 'checkbox': control.click()
    else: control.focus(); page.keyboard.press('ArrowRight')
    return kind


def _round_trip(page, stem)->str:
    "Change a control of the first widget that has controls and an output part; wait for its output to change."
    boxes = page.locator('.jp-OutputArea-output .widget-vbox, .jp-OutputArea-output .widget-hbox').filter(
        has=page.locator(OUTPUTS)).filter(has=page.locator(', '.join(CONTROLS.values())))
    assert boxes.count() >= 1, f'{stem}: no widget with a control and an output part'
    box = boxes.first
    box.scroll_into_view_if_needed()
    before = _signature(box)
    assert before, f'{stem}: the widget output is empty before any change'
    control = _move(page, box)
    deadline = time.time() + 60
    while _signature(box) == before:
        assert time.time() < deadline, f'{stem}: moving the {control} did not change the output in 60 s'
        page.wait_for_timeout(250)
    page.wait_for_timeout(500)
    box.screenshot(path=str(OUT/f'{stem}_widget.png'))
    box.evaluate("el => el.scrollIntoView({block: 'start'})")
    page.screenshot(path=str(OUT/f'{stem}.png'))          # the notebook, scrolled to the widget just moved
    return control


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_in_jupyterlab(browser, lab, nb):
    page = browser.new_page(viewport={'width': 1400, 'height': 1000})
    errors = []
    page.on('pageerror', lambda e: errors.append(str(e)))
    try:
        page.goto(f'{lab}lab/workspaces/{nb.stem}/tree/nbs/{nb.name}', wait_until='domcontentloaded')  # one tab only
        n_cells = len(read_notebook(nb).cells)             # wait for the notebook and its kernel
        page.wait_for_function(f"document.querySelectorAll('.jp-NotebookPanel .jp-Cell').length === {n_cells}",
                               timeout=60000)
        page.locator('#jp-main-statusbar', has_text='Idle').wait_for(timeout=120000)
        seconds = _run_all(page)
        widgets = page.locator('.jp-OutputArea-output .jupyter-widgets').count()
        text = page.locator('.jp-NotebookPanel').inner_text()
        assert 'Error displaying widget' not in text and 'Loading widget...' not in text
        assert widgets >= 1, f'{nb.stem}: no widget rendered'
        control = _round_trip(page, nb.stem)
        print(f'{nb.stem}: ran in {seconds:.0f} s, {widgets} widget views, {control} round trip OK')
        assert not errors, '\n'.join(errors)
    except BaseException:
        page.screenshot(path=str(OUT/f'{nb.stem}_failed.png')); raise
    finally:
        page.close()
        _shutdown_kernels(lab)


def _shutdown_kernels(url):
    "Stop the server's kernels through its REST API (each notebook gets a fresh one)."
    try:
        with urllib.request.urlopen(url + 'api/kernels', timeout=5) as r: kernels = json.load(r)
        for k in kernels:
            urllib.request.urlopen(urllib.request.Request(url + f"api/kernels/{k['id']}", method='DELETE'), timeout=10)
    except OSError: pass
