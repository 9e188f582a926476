"""The offline docs site (`medssm docs build`) in a real browser: every page loads with no console errors and no
request leaving 127.0.0.1, plots are drawn, stored widgets render, and a widget responds to input.

Needs Debian's `chromium` and the `playwright` package; without them these tests FAIL (skip them explicitly with
`-m "not browser"`). The notebooks are executed once per pytest process (shared with tests/test_notebooks.py).
Screenshots go to tests/_out/docs_browser/."""
import os, re, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
from medssm.docs import serve_site, list_notebooks

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT/'tests'/'_out'/'docs_browser'
PAGES = [p.stem for p in list_notebooks(ROOT/'nbs')]
WALKTHROUGHS = [p.stem for p in sorted((ROOT/'nbs').glob('[0-9]9_*.ipynb'))]


def _build_one(stem, out, cache, attempts=5, limit=240):
    "Execute + render one notebook in a subprocess killed after `limit` s (a rare kernel hang), retried."
    exe = Path(sys.executable).with_name('medssm')
    for attempt in range(attempts):
        proc = subprocess.Popen([str(exe), 'docs', 'build', '--out', str(out), '--nbs', str(ROOT/'nbs'),
                                 '--cache', str(cache), '--only', stem], start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            log, _ = proc.communicate(timeout=limit)
            return proc.returncode, log
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.communicate()     # the kernel goes with its process group
            print(f'{stem}: no progress in {limit} s (attempt {attempt + 1}); killed and retrying', flush=True)
    return 1, f'{stem}: timed out {attempts} times'


@pytest.fixture(scope='module')
def site(browser):
    "Build the whole site (executing each notebook once in quick mode) and serve it on 127.0.0.1."
    out, cache = OUT.parent/'docs_site', OUT.parent/'nbexec'
    for d in (out, OUT, cache): shutil.rmtree(d, ignore_errors=True)
    OUT.mkdir(parents=True)
    t0 = time.time()
    failures = {}
    for stem in PAGES:
        rc, log = _build_one(stem, out, cache)
        if rc != 0: failures[stem] = log[-3000:]
    print(f'site built in {time.time() - t0:.0f} s')
    assert not failures, 'notebooks failed while building the site:\n\n' + '\n\n'.join(failures.values())
    with serve_site(out) as url: yield url


def open_page(browser, url):
    "Open `url`; returns (page, problems): console errors, page errors, failed and non-local requests."
    page = browser.new_page(viewport={'width': 1300, 'height': 900})
    problems, base = [], url.split('/')[2]
    page.on('console', lambda m: problems.append(f'console {m.type}: {m.text}') if m.type == 'error' else None)
    page.on('pageerror', lambda e: problems.append(f'page error: {e}'))
    page.on('requestfailed', lambda r: problems.append(f'request failed: {r.url}'))
    page.on('response', lambda r: problems.append(f'HTTP {r.status}: {r.url}') if r.status >= 400 else None)
    def route(r):                            # the site must be self-contained: no CDN, no fonts from the web
        if r.request.url.split('/')[2] != base and not r.request.url.startswith('data:'):
            problems.append(f'request leaves the site: {r.request.url}'); r.abort()
        else: r.continue_()
    page.route('**/*', route)
    page.goto(url, wait_until='load')
    return page, problems


def wait_widgets(page, timeout=20):
    "Wait until every stored widget view has rendered; returns the number of views."
    n = page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
    deadline = time.time() + timeout
    while n and time.time() < deadline:
        if page.locator('.jp-OutputArea-output .jupyter-widgets').count() >= n: break
        page.wait_for_timeout(200)
    return n


@pytest.mark.parametrize('stem', PAGES)
def test_page_loads_clean(browser, site, stem):
    page, problems = open_page(browser, f'{site}{stem}.html')
    try:
        n = wait_widgets(page)
        page.wait_for_load_state('networkidle')
        page.screenshot(path=str(OUT/f'{stem}.png'), full_page=True)
        assert page.locator('nav.medssm-sidebar a[href="index.html"]').count() >= 1, 'sidebar missing'
        assert page.locator(f'nav.medssm-sidebar a.current[href="{stem}.html"]').count() == 1
        rendered = page.locator('.jp-OutputArea-output .jupyter-widgets').count()
        assert rendered >= n, f'{n} stored widget views, {rendered} rendered'
        assert 'Error displaying widget' not in page.content()
        broken = page.evaluate("[...document.querySelectorAll('.jp-OutputArea-output img')]"
                               ".filter(i => !(i.complete && i.naturalWidth > 0)).length")
        assert broken == 0, f'{broken} output images did not load'
        assert not problems, '\n'.join(problems)
    finally: page.close()


def test_plots_present(browser, site):
    "matplotlib figures (also inside stored Output widgets) and plotly figures are drawn."
    page, problems = open_page(browser, f'{site}04_widgets.html')
    wait_widgets(page)
    assert page.locator('.jp-OutputArea-output img').count() >= 2
    assert page.locator('.widget-output img').count() >= 1, "the OverlayViewer's stored figure is not shown"
    page.close()
    page, problems = open_page(browser, f'{site}07_docs.html')
    page.locator('.js-plotly-plot .main-svg').first.wait_for(timeout=15000)
    assert page.locator('.js-plotly-plot .scatterlayer .trace').count() >= 1
    page.close()
    assert not problems, '\n'.join(problems)


@pytest.mark.parametrize('stem', WALKTHROUGHS)
def test_walkthrough_page_has_plots(browser, site, stem):
    page, problems = open_page(browser, f'{site}{stem}.html')
    wait_widgets(page)
    plots = page.locator('.jp-OutputArea-output img, .js-plotly-plot').count()
    page.close()
    assert plots >= 1, f'{stem}: no figure in the page'


def test_widget_responds_to_input(browser, site):
    "A slider moved with the keyboard updates its readout and, through a jslink, the linked text box."
    page, problems = open_page(browser, f'{site}07_docs.html')
    wait_widgets(page)
    box = page.locator('.widget-vbox', has=page.locator('.widget-inline-hbox.widget-text')).first
    readout, text = box.locator('.widget-readout').first, box.locator('.widget-text input').first
    before = (readout.inner_text().strip(), text.input_value())
    assert before == ('3', '3'), before
    box.locator('.noUi-handle').first.focus()
    for _ in range(2): page.keyboard.press('ArrowRight')
    page.wait_for_function("el => el.value === '5'", arg=text.element_handle(), timeout=5000)
    assert readout.inner_text().strip() == '5'
    box.screenshot(path=str(OUT/'widget_after_input.png'))
    page.close()
    assert not problems, '\n'.join(problems)
