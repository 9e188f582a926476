"""The offline docs site (`medssm docs build`) in a real browser: every page loads with no console errors and no
request leaving 127.0.0.1, plots are drawn, stored widgets render, and a widget responds to input.

Needs Debian's `chromium` and the `playwright` package; without them these tests FAIL (skip them explicitly with
`-m "not browser"`). The notebooks are executed once per test session (tests/conftest.py, shared with tests/test_notebooks.py).
Screenshots go to tests/_out/docs_browser/."""
import shutil, time
from pathlib import Path

import pytest
from medssm.tools.docs import serve_site, list_notebooks

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT/'tests'/'_out'/'docs_browser'
PAGES = [p.stem for p in list_notebooks(ROOT/'nbs')]
WALKTHROUGHS = [p.stem for p in sorted((ROOT/'nbs').glob('[0-9]9_*.ipynb'))]


@pytest.fixture(scope='module')
def site(browser, docs_site):
    """The site built by conftest's `executed_notebooks` (every notebook executed once in quick mode), on 127.0.0.1.
    A notebook that failed still has its page (with the error on top); its page test fails, the others run."""
    shutil.rmtree(OUT, ignore_errors=True); OUT.mkdir(parents=True)
    with serve_site(docs_site) as url: yield url


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
        assert page.locator('.medssm-failed').count() == 0, f'{stem} failed when the site was built'
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


def test_search_finds_a_function_and_lands_on_its_api_entry(browser, site):
    "Type a function's name in the sidebar's search box, press Enter: the API page opens at that function."
    page, problems = open_page(browser, f'{site}00_core.html')
    try:
        page.fill('#medssm-search', 'load_weights')
        page.wait_for_function("document.querySelectorAll('#medssm-results a').length > 0", timeout=10000)
        assert page.locator('#medssm-results a').first.inner_text() == 'load_weights'
        page.press('#medssm-search', 'Enter')
        page.wait_for_url('**/api/medssm.weights.html#load_weights', timeout=10000)
        assert page.locator('[id="load_weights"]').count() == 1 and 'allow_missing' in page.inner_text('main')
        page.screenshot(path=str(OUT/'search.png'))
        assert not problems, problems
    finally: page.close()


def test_every_module_has_an_api_page(browser, site, docs_site):
    from medssm.tools.docs import library_modules
    mods = library_modules()
    missing = [m for m in mods if not (docs_site/'api'/f'{m}.html').exists()]
    assert not missing, missing
    page, problems = open_page(browser, f'{site}api/index.html')
    try:
        assert page.locator('table a').count() == len(mods)
        assert not problems, problems
    finally: page.close()
