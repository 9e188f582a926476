"""Paper 1 (MIL) tests beyond the notebooks: CLI subprocess runs, error messages, resume, benchmark JSON."""
import json, os, re, subprocess, sys
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch

import medssm.mil.cli                                   # registers the mil and wsi commands
from medssm.cli import main
from medssm.mil.models import bench_mil, create_model
from medssm.mil.ssm import S4D, check_ssm_methods

ROOT = Path(__file__).resolve().parents[1]
SMALL = ['--n-bags', '12', '--min-len', '10', '--max-len', '30', '--in-dim', '16', '--witness-rate', '0.1']


def _medssm(*args, timeout=300):
    "The command line in a fresh process (`medssm.mil.cli` imported first, whatever medssm.cli.GROUPS says)."
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    code = 'import sys, medssm.mil.cli; from medssm.cli import main; sys.exit(main())'
    return subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


@pytest.mark.parametrize('name,expected', [('ssm', 1_085_954), ('transmil', 2_672_146), ('clam_sb', 790_791),
                                           ('clam_mb', 791_048), ('transformer', 1_054_978), ('lstm', 789_250),
                                           ('meanpool', 1_025), ('maxpool', 1_025)])
def test_table2_param_counts(name, expected):
    from medssm.mil.train import MILConfig, build_mil_model
    assert create_model(name).n_params == expected
    assert build_mil_model(MILConfig(model=name)).n_params == expected      # the paper config builds Table 2's model
    assert create_model('ssm', d_state=128).n_params == create_model('ssm@128').n_params == 1_184_258


def test_s4d_reference_state_dict_loads():
    "A state_dict with the reference code's names and shapes loads into our layer."
    ref = {'D': torch.randn(8), 'kernel.log_dt': torch.randn(8), 'kernel.C': torch.randn(8, 3, 2),
           'kernel.log_A_real': torch.randn(8, 3), 'kernel.A_imag': torch.randn(8, 3),
           'output_linear.0.weight': torch.randn(16, 8, 1), 'output_linear.0.bias': torch.randn(16)}
    layer = S4D(8, d_state=6)
    layer.load_state_dict(ref)
    assert check_ssm_methods(d_model=3, d_state=4, L=130, chunk=64, bidirectional=True) < 1e-10


def _features(tmp, n=3, nan_slide=None):
    rows = []
    for i in range(n):
        x = np.random.default_rng(i).normal(size=(5 + i, 8)).astype(np.float32)
        if f's{i}' == nan_slide: x[1, 2] = np.nan
        torch.save(torch.from_numpy(x), tmp / f's{i}.pt'); rows.append(dict(slide_id=f's{i}', label=i % 2))
    pd.DataFrame(rows).to_csv(tmp / 'slides.csv', index=False)


def test_cli_errors_name_the_slide(tmp_path, capsys):
    _features(tmp_path)
    pd.DataFrame({'slide_id': ['s0', 'ghost'], 'label': [0, 1]}).to_csv(tmp_path / 'missing.csv', index=False)
    p = _medssm('mil', 'train', '--slides', str(tmp_path / 'missing.csv'), '--features', str(tmp_path),
                '--out', str(tmp_path / 'r'))                     # the installed entry point: exit 2, one line
    assert p.returncode == 2 and "slide 'ghost'" in p.stderr and 'Traceback' not in p.stderr
    _features(tmp_path, n=4, nan_slide='s2')
    assert main(['mil', 'cv', '--slides', str(tmp_path / 'slides.csv'), '--features', str(tmp_path), '--in-dim', '8',
                 '--folds', '2', '--out', str(tmp_path / 'cv')]) == 2
    assert re.search(r"1 of 4 bags failed the input check: \S*s2\.pt: 1 patch\(es\) have NaN/inf", capsys.readouterr().err)
    assert not (tmp_path / 'cv').exists()                       # checked before anything was written
    assert main(['mil', 'cv', '--slides', str(tmp_path / 'slides.csv'), '--features', str(tmp_path), '--folds', '2']) == 2
    assert 'features have dimension 8, expected 1024 (in_dim, --in-dim)' in capsys.readouterr().err
    pd.DataFrame({'slide_id': ['s0', 's1'], 'label': [0, 7]}).to_csv(tmp_path / 'badlabel.csv', index=False)
    assert main(['mil', 'cv', '--slides', str(tmp_path / 'badlabel.csv'), '--features', str(tmp_path),
                 '--classes', '0', '1']) == 2
    assert "slide 's1' has label '7'" in capsys.readouterr().err
    _features(tmp_path)                                          # clean features again
    split = pd.DataFrame({'train': ['s0', 'nobody'], 'train_label': [0, 1], 'val': ['s1', None],
                          'val_label': [1, None], 'test': [None, None], 'test_label': [None, None]})
    split.to_csv(tmp_path / 'split.csv')
    assert main(['mil', 'train', '--slides', str(tmp_path / 'slides.csv'), '--features', str(tmp_path), '--in-dim', '8',
                 '--split', str(tmp_path / 'split.csv'), '--out', str(tmp_path / 'r2')]) == 2
    assert "'nobody' is not in the slide table" in capsys.readouterr().err


def test_cv_resumes_finished_folds(tmp_path):
    args = ['mil', 'cv', *SMALL, '--folds', '2', '--epochs', '1', '--d-state', '4', '--out', str(tmp_path)]
    assert main(args) == 0
    done = sorted((tmp_path / 'ssm' / 'cv').glob('fold_*.json'))
    assert len(done) == 2
    stamps = [f.stat().st_mtime_ns for f in done]
    (tmp_path / 'ssm' / 'cv' / 'fold_1.json').unlink()          # as if killed during fold 1
    assert main(args) == 0
    assert done[0].stat().st_mtime_ns == stamps[0]               # fold 0 was not recomputed
    assert (tmp_path / 'ssm' / 'cv' / 'fold_1.json').exists()
    summary = pd.read_csv(tmp_path / 'summary.csv')
    assert list(summary.model) == ['ssm'] and (tmp_path / 'splits' / 'fold0.csv').exists()


def test_train_eval_on_feature_files(tmp_path, capsys, caplog):
    "The h5 path end to end: train on files, eval reproduces the test metrics, external eval writes patch scores."
    import logging
    from medssm.mil.train import same_metrics
    from medssm.runs import Run
    caplog.set_level(logging.INFO, logger='medssm')
    import h5py
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        n = 6 + i
        with h5py.File(tmp_path / f'slide{i}.h5', 'w') as f:
            f['features'] = rng.normal(size=(n, 8)).astype(np.float32) + (i % 2)
            f['coords'] = rng.integers(0, 10, size=(n, 2)) * 256
        rows.append(dict(slide_id=f'slide{i}', label=['normal', 'tumor'][i % 2]))
    pd.DataFrame(rows).to_csv(tmp_path / 'slides.csv', index=False)
    common = ['--slides', str(tmp_path / 'slides.csv'), '--features', str(tmp_path)]
    assert main(['mil', 'train', *common, '--in-dim', '8', '--model', 'ssm', '--d-state', '4', '--epochs', '2',
                 '--out', str(tmp_path / 'run')]) == 0
    assert (tmp_path / 'run' / 'checkpoints' / 'best.pt').exists()
    run = Run(tmp_path / 'run')
    assert run.record()['data']['source'] == 'slides' and set(run.split['test']) <= {f'slide{i}' for i in range(8)}
    capsys.readouterr()
    assert main(['mil', 'eval', '--run', str(tmp_path / 'run'), '--json']) == 0       # the stored test split
    assert same_metrics(json.loads(capsys.readouterr().out), run.test_metrics())
    assert 'on the test split stored in the run' in caplog.text
    assert main(['mil', 'eval', *common, '--run', str(tmp_path / 'run'), '--patch-scores',
                 '--out', str(tmp_path / 'ext')]) == 0                                  # external: all 8 slides
    assert 'external slides' in caplog.text
    pred = pd.read_csv(tmp_path / 'ext' / 'predictions.csv')
    assert len(pred) == 8 and np.allclose(pred[['p0', 'p1']].sum(axis=1), 1, atol=1e-5)
    s = np.load(tmp_path / 'ext' / 'patch_scores' / 'slide3.npy')
    assert s.shape == (9,)
    with h5py.File(tmp_path / 'slide0.h5', 'a') as f: f['features'][0, 0] += 1        # the data changes after training
    assert main(['mil', 'eval', '--run', str(tmp_path / 'run')]) == 2
    assert 'changed since training' in capsys.readouterr().err


def test_bench_json_all_models(capsys):
    assert main(['bench', 'mil-speed', '--length', '64', '100', '--repeat', '1', '--warmup', '0', '--json', '--no-isolate']) == 0
    recs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r['model'] for r in recs} == {'ssm', 'transmil', 'clam_sb', 'clam_mb', 'transformer', 'lstm', 'meanpool', 'maxpool'}
    assert len(recs) == 2 * 9 and {r['d_state'] for r in recs if r['model'] == 'ssm'} == {32, 128}
    for r in recs: assert set(r) >= {'model', 'length', 'params', 'ms', 'peak_mb'} and r['ms'] > 0


def test_bench_isolated_process():
    "Each record can run in a fresh process (how peak memory is measured by default)."
    (rec,) = bench_mil(('meanpool',), lengths=(50,), repeat=1, warmup=0)
    assert rec['model'] == 'meanpool' and rec['params'] == 1025 and rec['peak_mb'] >= 0
