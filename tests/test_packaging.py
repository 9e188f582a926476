"""The package as a user installs it: a wheel built from this checkout, installed with `[all]` into a fresh virtual
environment outside the repository, runs `medssm demo` from there (the embedded demo data ships inside the wheel).

The fresh environment sees the test environment's site-packages through a `.pth` file, so pip resolves `[all]`
against what is already installed instead of downloading gigabytes again; medssm itself comes only from the wheel.
Also checked: the extras a user can choose exist, and the core install names the extra a missing dependency needs."""
import json, os, shutil, subprocess, sys, sysconfig, venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def wheel(tmp_path_factory)->Path:
    out = tmp_path_factory.mktemp('dist')
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return next(out.glob('medssm-*.whl'))


def test_wheel_metadata_has_the_extras_and_the_demo_data(wheel):
    import zipfile
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith('METADATA'))).decode()
    for extra in ('wsi', 'seg', 'meta', 'vlm', 'notebooks', 'docs', 'all', 'dev'):
        assert f'Provides-Extra: {extra}' in meta, extra
    assert 'medssm/_data/wsi/ihc_demo.tiff' in names and 'medssm/_data/vlm/wordnet30_adj_antonyms.tsv' in names
    assert 'openslide' not in [l.split(';')[0].split()[-1] for l in meta.splitlines() if l.startswith('Requires-Dist') and 'extra' not in l]


@pytest.fixture(scope='module')
def installed_demo(wheel, tmp_path_factory)->tuple[dict, Path]:
    "The wheel installed with `[all]` in a fresh venv, `medssm demo` run from a folder outside the repository."
    tmp = tmp_path_factory.mktemp('installed')
    env_dir, work = tmp/'venv', tmp/'elsewhere'
    venv.create(env_dir, with_pip=True)
    py = env_dir/'bin'/'python'
    purelib = subprocess.run([str(py), '-c', "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the test environment's packages, seen after the fresh environment's own (which will hold medssm)
    Path(purelib, 'medssm_test_env.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    subprocess.run([str(py), '-m', 'pip', 'uninstall', '-q', '-y', 'setuptools'], capture_output=True)   # the newer one comes through the .pth
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'MEDSSM_WORDNET_ANTONYMS')}
    # [all] resolved against the test environment; then medssm itself from the wheel even though the test environment
    # (seen through the .pth) already holds an editable medssm of the same version
    for spec in ([f'{wheel}[all]'], ['--no-deps', '--force-reinstall', str(wheel)]):
        r = subprocess.run([str(py), '-m', 'pip', 'install', '-q', '--no-index', *spec], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    work.mkdir()
    where = subprocess.run([str(py), '-c', 'import medssm; print(medssm.__file__)'], cwd=work, env=env, capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(env_dir)), where.stdout + where.stderr     # the installed copy, not the checkout
    demo = subprocess.run([str(env_dir/'bin'/'medssm'), 'demo', '--out', str(work/'demo'), '--threads', '2', '--json'],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert demo.returncode == 0, demo.stderr[-4000:]
    return json.loads(demo.stdout.strip().splitlines()[-1]), work/'demo'


def test_wheel_with_all_runs_the_demo_outside_the_repository(installed_demo):
    res, out = installed_demo
    assert res['failed'] == [] and (out/'report.html').exists()
    assert res['megabytes'] <= 50, res


@pytest.mark.browser
def test_demo_report_fits_the_window(browser, installed_demo):
    "The whole demo report (every paper's tables and figures, the environment) never needs horizontal scrolling."
    _, out = installed_demo
    shots = ROOT/'tests'/'_out'/'demo_report'; shots.mkdir(parents=True, exist_ok=True)
    for width in (1280, 800, 420):
        page = browser.new_page(viewport={'width': width, 'height': 900})
        try:
            page.goto((out/'report.html').as_uri(), wait_until='load')
            sw, iw = page.evaluate('[document.documentElement.scrollWidth, window.innerWidth]')
            if width == 800: page.screenshot(path=str(shots/'demo_report.png'), full_page=True)
            assert sw <= iw, f'{sw} px of content in a {iw} px window'
            assert page.locator('img').count() >= 4, 'a section figure is missing'
        finally: page.close()
