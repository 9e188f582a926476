"""Paper 3 part 1 (lazy meta-learning): the methods against the baseline, the CLI, the benchmark."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from medssm.meta.all import bench_meta, run_experiment, METHODS

EXE = str(Path(sys.executable).with_name('medssm'))


def medssm(*args, cwd=None):
    env = dict(os.environ, MEDSSM_QUICK='1', OMP_NUM_THREADS='1')
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_five_methods_beat_pretrain_finetune_on_sinusoid():
    "Every method, meta-trained briefly, fits held-out sinusoids better than pretraining on all tasks + fine-tuning."
    torch.set_num_threads(1)
    df = run_experiment('sinusoid', 'sinusoid', quick=True, iterations=300, eval_tasks=100, seed=0).set_index('variant')
    base = df.loc['pretrain_finetune', 'mean']
    for m in METHODS:
        assert df.loc[m, 'mean'] < base, f"{m}: query MSE {df.loc[m, 'mean']:.3f} vs baseline {base:.3f}"


def test_lazy_memory_flat_in_k_while_maml_grows():
    "The issue's target: lazy peak memory at k=50 within 1.3x of k=5; second-order MAML grows with k."
    torch.set_num_threads(1)
    lazy = {r['k']: r['peak_mb'] for r in bench_meta(ks=(5, 50), methods=('lazy_maml',), image_size=28, hidden=16)}
    maml = {r['k']: r['peak_mb'] for r in bench_meta(ks=(2, 10), methods=('maml',), image_size=28, hidden=16)}
    assert lazy[50] <= 1.3 * lazy[5] + 1.0, lazy   # +1 MiB: page-granularity noise of the RSS measure
    assert maml[10] > 1.5 * maml[2], maml          # linear growth on top of the query pass


def cli(capsys, *args):
    "Run `medssm ARGS` in-process (the console script's own entry point); (return code, stdout, stderr)."
    from medssm.cli import main
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_train_eval_resume_and_errors(tmp_path, capsys):
    torch.set_num_threads(1)
    run = tmp_path/'run'
    args = ['meta', 'train', '--dataset', 'digits', '--quick', '--method', 'lazy_maml', '--iterations', 4,
            '--batches-per-epoch', 2, '--eval-tasks', 6, '--hidden', 8, '--out', run, '--json']
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res['metric'] == 'accuracy_%' and 0 <= res['mean'] <= 100 and res['n'] == 6
    assert (run/'results.json').exists() and (run/'checkpoints'/'last.pt').exists()
    # a second call resumes the finished run and reproduces the score
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])['mean'] == res['mean']
    # eval re-scores the run folder
    rc, out, err = cli(capsys, 'meta', 'eval', '--run', run, '--tasks', 6, '--json')
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])['mean'] == res['mean']
    # a changed config in the same folder, an impossible episode, a missing run: one clear error each
    rc, out, err = cli(capsys, *[a if a != 'lazy_maml' else 'maml' for a in args])
    assert rc == 2 and 'different config' in err
    rc, out, err = cli(capsys, 'meta', 'train', '--dataset', 'digits', '--quick', '--n-way', 9, '--out', tmp_path/'r5')
    assert rc == 2 and 'pool has 8' in err and 'Traceback' not in err
    rc, out, err = cli(capsys, 'meta', 'eval', '--run', tmp_path/'nothing')
    assert rc == 2 and 'meta_config.json' in err


def test_bench_meta_json():
    r = medssm('bench', 'meta', '--k', 1, 3, '--methods', 'maml', 'lazy_reptile', '--image-size', 16, '--hidden', 8, '--json')
    assert r.returncode == 0, r.stderr
    recs = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(d['method'], d['k']) for d in recs] == [('maml', 1), ('maml', 3), ('lazy_reptile', 1), ('lazy_reptile', 3)]
    assert all(set(d) == {'method', 'k', 'peak_mb', 'ms'} and d['ms'] > 0 for d in recs)
