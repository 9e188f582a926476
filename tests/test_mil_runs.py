"""Paper 1 run folders through `medssm mil …`: crafted checkpoints never execute, changed resumes are refused without
touching the folder, a live run folder is refused at once, eval reproduces the training-time test metrics whatever
seed it is given, bad values and bad inputs fail before anything is written, random-forest runs load through skops,
and cross-validation results are keyed on the config and data."""
import json, logging, os, subprocess, sys, time, zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import medssm.mil.cli                                   # registers the mil commands
from medssm.cli import main
from medssm.runs import Run, load_run
from medssm.mil.models import PooledForest
from medssm.mil.train import same_metrics

ROOT = Path(__file__).resolve().parents[1]
SMALL = ['--n-bags', '12', '--min-len', '10', '--max-len', '30', '--in-dim', '16', '--witness-rate', '0.1',
         '--d-state', '4', '--max-epochs', '2']


def run(capsys, *argv):
    "`medssm <argv>` in-process: (exit status, stdout, stderr)."
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error_line(err:str)->str:
    "The single `error:` line of a failed command (and no traceback)."
    lines = [l for l in err.splitlines() if l.startswith('error:')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


def snapshot(folder:Path)->dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


class Evil:
    "A pickle that writes a marker file when it is unpickled."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def trained(tmp_path, capsys):
    "A finished run folder of SSM-MIL on small digit bags."
    rc, out, err = run(capsys, 'mil', 'train', *SMALL, '--out', tmp_path/'run', '--json')
    assert rc == 0, err
    return tmp_path/'run'


def test_eval_reproduces_test_metrics(trained, capsys, caplog):
    caplog.set_level(logging.INFO, logger='medssm')
    stored = Run(trained).test_metrics()
    assert set(stored) >= {'test_acc', 'test_auroc', 'n_long', 'long_acc'}
    for seed in (0, 123):                                     # the seed flag changes nothing
        rc, out, err = run(capsys, 'mil', 'eval', '--run', trained, '--seed', seed, '--json')
        assert rc == 0, err
        assert same_metrics(json.loads(out), stored)
    assert 'on the test split stored in the run' in caplog.text
    assert 'equal the test metrics recorded at training time' in caplog.text
    pred = pd.read_csv(trained/'eval'/'predictions.csv')
    assert list(pred.slide_id) == Run(trained).split['test']
    rc, out, err = run(capsys, 'mil', 'eval', '--run', trained, '--part', 'val', '--json')   # another stored part
    assert rc == 0 and json.loads(out)['test_acc'] >= 0


def test_crafted_checkpoint_never_runs(trained, tmp_path, capsys):
    marker = tmp_path/'pwned.txt'
    best = trained/'checkpoints'/'best.pt'
    torch.save({'model': torch.load(best, weights_only=True)['model'], 'x': Evil(marker)}, best)
    rc, out, err = run(capsys, 'mil', 'eval', '--run', trained)
    assert rc == 2 and 'refused' in one_error_line(err) and not marker.exists()
    last = trained/'checkpoints'/'last.pt'
    torch.save({'model': {}, 'x': Evil(marker)}, last)
    rc, out, err = run(capsys, 'mil', 'train', *SMALL[:-1], '3', '--out', trained)   # a resume with a longer budget
    assert rc == 2 and 'refused' in one_error_line(err) and not marker.exists()


def test_changed_resume_is_refused_and_touches_nothing(trained, capsys):
    before = snapshot(trained)
    for change, named in ((['--model', 'clam_sb'], 'model: "ssm" → "clam_sb"'),
                          (['--d-state', '8'], 'd_state: 4 → 8'),
                          (['--n-bags', '14'], 'data fingerprint'),
                          (['--lr', '0.01'], 'fit.lr: 0.0002 → 0.01')):
        rc, out, err = run(capsys, 'mil', 'train', *SMALL, *change, '--out', trained)
        line = one_error_line(err)
        assert rc == 2 and named in line and 'nothing was changed' in line, line
        assert snapshot(trained) == before
    rc, out, err = run(capsys, 'mil', 'train', *SMALL, '--out', trained)       # the same command: already finished
    assert rc == 0 and snapshot(trained).keys() == before.keys()


def test_live_run_folder_is_refused_at_once(tmp_path, capsys):
    out = tmp_path/'run'
    args = ['mil', 'train', '--n-bags', '12', '--min-len', '200', '--max-len', '400', '--in-dim', '64', '--d-state', '8',
            '--max-epochs', '100000', '--patience', '0', '--out', str(out)]
    code = 'import sys, medssm.mil.cli; from medssm.cli import main; sys.exit(main())'
    first = subprocess.Popen([sys.executable, '-c', code, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        t0 = time.time()
        while not (out/'.lock').exists() and first.poll() is None and time.time() - t0 < 180: time.sleep(0.1)
        assert (out/'.lock').exists(), first.stderr.read().decode() if first.poll() is not None else 'no lock after 180 s'
        t1 = time.time()
        rc, _, err = run(capsys, *args)
        assert rc == 2 and f'in use by process {first.pid}' in one_error_line(err)
        assert time.time() - t1 < 30                                            # at once, not after training
        assert first.poll() is None                                             # the first run goes on
    finally: first.kill(); first.wait()


def test_bad_values_and_bad_inputs_fail_before_writing(tmp_path, capsys):
    for bad, named in ((['--d-state', '5'], '--d-state'), (['--d-state', '0'], '--d-state'), (['--n-layers', '0'], '--n-layers'),
                       (['--max-epochs', '0'], '--max-epochs 0'), (['--lr', '-1'], '--lr -1.0'), (['--batch-size', '4'], '--batch-size'),
                       (['--n-bags', '1'], '--n-bags'), (['--min-len', '50'], '--min-len'), (['--dropout', '1.5'], '--dropout'),
                       (['--model', 'lstm', '--multitask'], '--multitask'), (['--model', 'ssm@64'], '--d-state 128')):
        rc, out, err = run(capsys, 'mil', 'train', *SMALL, *bad, '--out', tmp_path/'r')
        assert rc == 2 and named in one_error_line(err), (bad, err)
    rc, out, err = run(capsys, 'mil', 'cv', *SMALL, '--folds', '1', '--out', tmp_path/'r')
    assert rc == 2 and '--folds' in one_error_line(err)
    assert not (tmp_path/'r').exists()
    # bad files: one NaN slide, one truncated .h5 — both named, before a run folder exists
    import h5py
    rows = []
    for i in range(8):
        x = np.random.default_rng(i).normal(size=(6, 8)).astype(np.float32)
        if i == 3: x[2, 1] = np.inf
        with h5py.File(tmp_path/f's{i}.h5', 'w') as f: f['features'] = x
        rows.append(dict(slide_id=f's{i}', label=i % 2))
    data = (tmp_path/'s5.h5').read_bytes(); (tmp_path/'s5.h5').write_bytes(data[:len(data) // 2])
    pd.DataFrame(rows).to_csv(tmp_path/'slides.csv', index=False)
    rc, out, err = run(capsys, 'mil', 'train', '--slides', tmp_path/'slides.csv', '--features', tmp_path, '--in-dim', 8,
                       '--out', tmp_path/'r')
    line = one_error_line(err)
    assert rc == 2 and 's5.h5' in line, line                                     # unreadable: found while listing
    (tmp_path/'s5.h5').write_bytes(data)
    rc, out, err = run(capsys, 'mil', 'train', '--slides', tmp_path/'slides.csv', '--features', tmp_path, '--in-dim', 8,
                       '--out', tmp_path/'r')
    line = one_error_line(err)
    assert rc == 2 and 's3.h5: 1 patch(es) have NaN/inf' in line, line
    assert not (tmp_path/'r').exists()


def test_forest_run_loads_through_skops(tmp_path, capsys):
    rc, out, err = run(capsys, 'mil', 'train', *SMALL, '--model', 'maxpool_rf', '--n-estimators', 10, '--out', tmp_path/'rf')
    assert rc == 0, err
    loaded = load_run(tmp_path/'rf')
    assert isinstance(loaded.model, PooledForest) and loaded.model.forest.n_estimators == 10
    rc, out, err = run(capsys, 'mil', 'eval', '--run', tmp_path/'rf', '--json', '--seed', 9)
    assert rc == 0 and same_metrics(json.loads(out), Run(tmp_path/'rf').test_metrics())
    # a skops file naming a type outside the forest's is refused before anything is built
    path = tmp_path/'rf'/'forest.skops'
    with zipfile.ZipFile(path) as z: items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, 'w') as z:
        for info, data in items:
            if info.filename == 'schema.json':
                schema = json.loads(data); schema['__module__'], schema['__class__'] = 'os', 'system'
                data = json.dumps(schema).encode()
            z.writestr(info, data)
    rc, out, err = run(capsys, 'mil', 'eval', '--run', tmp_path/'rf')
    assert rc == 2 and 'refused' in one_error_line(err)


def test_cv_results_are_keyed_on_config_and_data(tmp_path, capsys):
    args = ['mil', 'cv', *SMALL[:-1], '1', '--folds', '2', '--out', tmp_path]
    assert run(capsys, *args)[0] == 0
    fold0 = tmp_path/'ssm'/'cv'/'fold_0.json'
    first = json.loads(fold0.read_text())
    stamp = fold0.stat().st_mtime_ns
    assert run(capsys, *args)[0] == 0 and fold0.stat().st_mtime_ns == stamp           # same config and data: reused
    assert run(capsys, *args, '--lr', '0.003')[0] == 0                                 # another config: recomputed
    assert json.loads(fold0.read_text())['key'] != first['key']
    assert run(capsys, *args[:-2], '--witness-rate', '0.2', '--out', tmp_path)[0] == 0  # other data: recomputed
    assert len({json.loads(fold0.read_text())['key'], first['key']}) == 2
    assert len(list((tmp_path/'ssm').glob('fold_0-*'))) == 3                           # one run folder per config/data
