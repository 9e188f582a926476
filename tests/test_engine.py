"""End-to-end checks of the shared engine that need real processes: resume after SIGKILL, torchrun DDP,
atomic writes under a crash, and the console script."""
import json, os, random, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT/'tests'/'scripts'/'fit_digits.py'
PY = sys.executable
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MEDSSM_DEVICE': 'cpu'}


def _history(run):
    return [{k: v for k, v in json.loads(l).items() if k != 'seconds'}
            for l in (Path(run)/'metrics.jsonl').read_text().splitlines() if l.strip()]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    epochs = 5
    subprocess.run([PY, str(SCRIPT), str(tmp_path/'ref'), str(epochs)], check=True, env=ENV, timeout=300)
    rng = random.Random(7)
    run = tmp_path/'killed'
    for attempt in range(2):     # kill twice, at arbitrary moments (inside an epoch or while checkpointing)
        proc = subprocess.Popen([PY, str(SCRIPT), str(run), str(epochs), '--sleep', '0.004'], env=ENV)
        deadline = time.time() + 120
        need = attempt + 1
        while time.time() < deadline and not ((run/'metrics.jsonl').exists() and len(_history(run)) >= need):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL); proc.wait()
    assert len(_history(run)) < epochs, 'the run finished before it could be killed; slow it down'
    subprocess.run([PY, str(SCRIPT), str(run), str(epochs)], check=True, env=ENV, timeout=300)
    assert _history(run) == _history(tmp_path/'ref')
    assert not list(run.rglob('*.tmp'))      # temp files of the killed attempts were swept


def test_torchrun_two_processes_gloo(tmp_path):
    torchrun = Path(PY).with_name('torchrun')
    out = tmp_path/'ranks'
    r = subprocess.run([str(torchrun), '--nproc_per_node', '2', '--master_port', str(29500 + os.getpid() % 1000),
                        str(SCRIPT), str(tmp_path/'ddp'), '3', '--ranks-out', str(out)],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out/f'rank{i}.json').read_text()) for i in range(2)]
    assert ranks[0]['checksum'] == pytest.approx(ranks[1]['checksum'], rel=1e-6)   # DDP kept replicas identical
    assert ranks[0]['epochs'] == ranks[1]['epochs'] == 3
    assert len(_history(tmp_path/'ddp')) == 3                                      # rank 0 alone wrote the log
    assert ranks[0]['val_acc'] > 0.8


def test_atomic_write_survives_kill(tmp_path):
    target = tmp_path/'big.bin'
    code = f"""
import time
from medssm.core import atomic_write
with open({str(target)!r}, 'wb') as f: f.write(b'old')
with atomic_write({str(target)!r}, 'wb') as f:
    for _ in range(10000):
        f.write(b'x' * 100000); f.flush(); time.sleep(0.001)
"""
    proc = subprocess.Popen([PY, '-c', code], env=ENV)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob('.big.bin.*')): time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert target.read_bytes() == b'old'     # never a half-written destination


def test_cli_demo_and_errors(tmp_path):
    exe = Path(PY).with_name('medssm')
    r = subprocess.run([str(exe), 'demo', '--only', 'engine', '--out', str(tmp_path/'demo')],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path/'demo'/'report.html').exists()
    assert 'report written to' in r.stdout
    bad = subprocess.run([str(exe), 'demo', '--only', 'nonexistent', '--out', str(tmp_path/'x')],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith('error: --only nonexistent') and 'Traceback' not in bad.stderr


def test_second_run_into_a_live_folder_is_refused_at_once(tmp_path):
    run = tmp_path/'live'
    first = subprocess.Popen([PY, str(SCRIPT), str(run), '50', '--sleep', '0.01'], env=ENV)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run/'.lock').exists(): time.sleep(0.02)
        assert (run/'.lock').exists(), 'the first run never started'
        t0 = time.time()
        second = subprocess.run([PY, str(SCRIPT), str(run), '50'], env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and f'in use by process {first.pid}' in second.stderr, second.stderr[-2000:]
        assert time.time() - t0 < 60          # refused at start-up, not after training
    finally:
        first.kill(); first.wait()
    # the killed run left a stale lock: the next start takes it over and resumes
    done = subprocess.run([PY, str(SCRIPT), str(run), '2'], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (run/'.lock').exists()


_EVIL = """
import os, torch
class Evil:
    def __reduce__(self): return (os.system, ('touch {marker}',))
torch.save({{'model': {{}}, 'epoch': 0, 'x': Evil()}}, {path!r})
"""

def test_crafted_checkpoint_does_not_run_on_resume(tmp_path):
    run = tmp_path/'r'
    subprocess.run([PY, str(SCRIPT), str(run), '1'], check=True, env=ENV, timeout=300)
    marker = tmp_path/'pwned'
    subprocess.run([PY, '-c', _EVIL.format(marker=marker, path=str(run/'checkpoints'/'last.pt'))], check=True, env=ENV)
    r = subprocess.run([PY, str(SCRIPT), str(run), '2'], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and 'refused' in r.stderr, r.stderr[-2000:]
    assert not marker.exists()


def test_help_and_version_do_not_import_torch():
    code = ("import sys, io, contextlib\nfrom medssm.cli import main\n"
            "for argv in (['--help'], ['--version']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try: main(argv)\n"
            "        except SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'pandas', 'sklearn')))")
    r = subprocess.run([PY, '-c', code], env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == '[]', r.stdout + r.stderr
    v = subprocess.run([str(Path(PY).with_name('medssm')), '--version'], env=ENV, capture_output=True, text=True, timeout=60)
    assert v.stdout.startswith('medssm ') and v.returncode == 0



def test_docs_tools_are_optional_but_named_when_missing(tmp_path):
    "Without the [docs] extra the git filter (`medssm docs clean`) still works; building the site names the extra."
    nb = {'cells': [{'cell_type': 'code', 'source': 'x = 1', 'outputs': [{'output_type': 'stream', 'text': '1'}],
                     'execution_count': 3, 'metadata': {}, 'id': 'abc'}], 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}
    blocked = "import sys\nfor m in ('nbformat', 'nbclient', 'nbconvert', 'nbdev'): sys.modules[m] = None\n"
    clean = blocked + "from medssm.cli import main\nsys.exit(main(['docs', 'clean']))"
    r = subprocess.run([PY, '-c', clean], input=json.dumps(nb), env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cell = json.loads(r.stdout)['cells'][0]
    assert cell['outputs'] == [] and cell['execution_count'] is None and 'id' not in cell
    build = blocked + f"from medssm.cli import main\nsys.exit(main(['docs', 'build', '--out', {str(tmp_path/'site')!r}]))"
    r = subprocess.run([PY, '-c', build], env=ENV, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and 'pip install "medssm[docs]"' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_isolated_child_does_not_outlive_a_killed_parent(tmp_path):
    "`run_isolated` children (benchmarks, training workers use the same guard) exit when their parent is killed."
    (tmp_path/'sleeper.py').write_text("import os, time\ndef sleep(pidfile, seconds):\n"
                                       "    open(pidfile, 'w').write(str(os.getpid())); time.sleep(seconds)\n")
    pidfile = tmp_path/'child.pid'
    code = f"from medssm.bench import run_isolated\nrun_isolated('sleeper:sleep', {{'pidfile': {str(pidfile)!r}, 'seconds': 120}})"
    env = {**ENV, 'PYTHONPATH': os.pathsep.join([str(tmp_path), ENV.get('PYTHONPATH', '')])}
    parent = subprocess.Popen([PY, '-c', code], env=env)
    try:
        for _ in range(600):
            if pidfile.exists() and pidfile.read_text(): break
            time.sleep(0.1)
        child = int(pidfile.read_text())
        parent.kill(); parent.wait()
        from medssm.core import pid_alive
        for _ in range(100):
            if not pid_alive(child): break
            time.sleep(0.1)
        alive = pid_alive(child)
        if alive: os.kill(child, signal.SIGKILL)
        assert not alive, 'the child ran on after its parent was killed'
    finally: parent.kill()


def test_exported_names_are_defined_once():
    "No two library modules export the same name (the `all` modules re-export; per-family registries excepted)."
    import importlib, pkgutil, medssm
    allowed = {'create_model', 'list_models', 'MODELS'}
    owners = {}
    for m in pkgutil.walk_packages(medssm.__path__, 'medssm.'):
        if m.name.endswith('.all') or m.name.endswith('_modidx'): continue
        mod = importlib.import_module(m.name)
        for name in getattr(mod, '__all__', []):
            owners.setdefault(name, []).append(m.name)
    dup = {n: ms for n, ms in owners.items() if len(ms) > 1 and n not in allowed}
    assert not dup, dup
