"""Paper 3 run folders: `meta train` / `meta eval` through `medssm.runs` — the stored score reproduced whatever seed flag,
crafted checkpoints refused, resumes with another model or data refused without touching the folder, a live folder
locked, and bad values or files rejected before anything is created."""
import json, os, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medssm.runs import Run

EXE = str(Path(sys.executable).with_name('medssm'))
TINY = ['--quick', '--method', 'lazy_maml', '--epochs', '2', '--steps-per-epoch', '2', '--eval-tasks', '6', '--hidden', '8',
        '--val-batches', '1']


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def cli(capsys, *args):
    "`medssm ARGS` in this process: (exit status, stdout, stderr)."
    from medssm.cli import main
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error(err:str)->bool:
    "Exactly one `error:` line and no traceback."
    return sum(l.startswith('error:') for l in err.splitlines()) == 1 and 'Traceback' not in err


def snapshot(folder:Path)->dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob('*')) if p.is_file()}


def train(capsys, out, *extra):
    rc, stdout, err = cli(capsys, 'meta', 'train', *TINY, '--out', out, *extra, '--json')
    assert rc == 0, err
    return json.loads(stdout)


def omniglot(root:Path, seed=0)->Path:
    "A tiny Omniglot layout: 2 alphabets × 2 characters × 3 images in background, 2 characters in evaluation."
    rng = np.random.default_rng(seed)
    for part, alphabets in (('images_background', ('A', 'B')), ('images_evaluation', ('C',))):
        for a in alphabets:
            for c in ('c1', 'c2'):
                d = root/part/a/c; d.mkdir(parents=True)
                for i in range(3): Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(d/f'{i}.png')
    return root


FOLDER = ['--dataset', 'omniglot', '--n-way', '2', '--k-shot', '1', '--n-val', '1', '--n-query', '1', '--hidden', '4',
          '--method', 'fomaml', '--inner-steps', '1', '--epochs', '1', '--steps-per-epoch', '1', '--meta-batch', '2',
          '--val-batches', '1', '--eval-tasks', '4']


def test_eval_reproduces_the_stored_score_whatever_the_seed_flag(tmp_path, capsys):
    res = train(capsys, tmp_path/'r')
    stored = Run(tmp_path/'r').test_metrics()
    assert {k: res[k] for k in stored} == stored and stored['n'] == 6
    for seed in ([], ['--seed', '123']):
        rc, out, err = cli(capsys, 'meta', 'eval', '--run', tmp_path/'r', *seed, '--json')
        assert rc == 0, err
        assert json.loads(out) == {'run': str(tmp_path/'r'), **stored}
    # other tasks only when asked for by name
    rc, out, err = cli(capsys, 'meta', 'eval', '--run', tmp_path/'r', '--task-seed', '5', '--tasks', '30', '--json')
    assert rc == 0 and json.loads(out)['task_seed'] == 5 and json.loads(out)['n'] == 30, err
    record = json.loads((tmp_path/'r'/'run.json').read_text())
    assert record['kind'] == 'meta' and record['data']['dataset'] == 'digits'
    assert len(record['split']['test']['classes']) == 8 and record['split']['test']['task_seed'] == stored['task_seed']


def test_crafted_checkpoints_never_execute(tmp_path, capsys):
    train(capsys, tmp_path/'r')
    marker = tmp_path/'pwned'

    class Evil:
        def __reduce__(self): return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))
    torch.save({'model': {}, 'x': Evil()}, tmp_path/'r'/'checkpoints'/'best.pt')
    rc, out, err = cli(capsys, 'meta', 'eval', '--run', tmp_path/'r')
    assert rc == 2 and 'refused' in err and one_error(err) and not marker.exists(), err
    torch.save({'model': {}, 'x': Evil()}, tmp_path/'r'/'checkpoints'/'last.pt')
    rc, out, err = cli(capsys, 'meta', 'train', *TINY, '--out', tmp_path/'r', '--epochs', '3')   # a resume reads last.pt
    assert rc == 2 and 'refused' in err and one_error(err) and not marker.exists(), err


def test_resume_with_another_model_size_or_data_is_refused_untouched(tmp_path, capsys):
    train(capsys, tmp_path/'r')
    before = snapshot(tmp_path/'r')
    for flags, named in ((['--hidden', '16'], 'hidden: 8 → 16'), (['--k-shot', '2'], 'k_shot: 1 → 2'),
                         (['--no-shuffle-labels'], 'shuffle_labels'), (['--seed', '1'], 'fit.seed: 0 → 1')):
        rc, out, err = cli(capsys, 'meta', 'train', *TINY, '--out', tmp_path/'r', *flags)
        assert rc == 2 and named in err and one_error(err), (flags, err)
        assert snapshot(tmp_path/'r') == before
    # a longer epoch budget is a resume, not another run
    assert train(capsys, tmp_path/'r', '--epochs', '3')['n'] == 6
    # folder data: a replaced image changes the fingerprint, and the resume is refused before anything changes
    root = omniglot(tmp_path/'omni')
    rc, out, err = cli(capsys, 'meta', 'train', *FOLDER, '--root', root, '--out', tmp_path/'f', '--json')
    assert rc == 0, err
    before = snapshot(tmp_path/'f')
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(root/'images_evaluation'/'C'/'c1'/'0.png')
    rc, out, err = cli(capsys, 'meta', 'train', *FOLDER, '--root', root, '--out', tmp_path/'f', '--epochs', '2')
    assert rc == 2 and 'data fingerprint' in err and one_error(err), err
    assert snapshot(tmp_path/'f') == before
    rc, out, err = cli(capsys, 'meta', 'eval', '--run', tmp_path/'f')            # eval notices the changed data too
    assert rc == 2 and 'changed since training' in err, err


def test_second_train_into_a_live_run_is_refused(tmp_path, capsys):
    out = tmp_path/'live'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.Popen([EXE, 'meta', 'train', '--dataset', 'sinusoid', '--quick', '--epochs', '1000', '--out', str(out)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (out/'.lock').exists():
            assert p.poll() is None, p.stderr.read()
            assert time.time() - t0 < 120, 'the first train never started'
            time.sleep(0.2)
        t0 = time.time()
        rc, _, err = cli(capsys, 'meta', 'train', '--dataset', 'sinusoid', '--quick', '--epochs', '1000', '--out', out)
        assert rc == 2 and f'in use by process {p.pid}' in err and one_error(err), err
        assert time.time() - t0 < 30                                             # refused at once, not after training
    finally:
        p.kill(); p.wait()


def test_bad_values_and_bad_files_fail_before_anything_is_created(tmp_path, capsys):
    for flags, msg in ((['--n-way', '1'], '--n-way 1: expected ≥ 2'), (['--k-shot', '0'], '--k-shot 0'),
                       (['--inner-steps', '0'], '--inner-steps 0'), (['--eval-tasks', '0'], '--eval-tasks 0'),
                       (['--n-way', '9'], 'pool has 8'),
                       (['--batch-size', '4'], '--meta-batch')):
        rc, out, err = cli(capsys, 'meta', 'train', '--quick', *flags, '--out', tmp_path/'x')
        assert rc == 2 and msg in err and one_error(err), (flags, err)
    root = omniglot(tmp_path/'omni')
    (root/'images_background'/'B'/'c2'/'1.png').write_bytes(b'\x89PNG truncated')
    (root/'images_evaluation'/'C'/'c1'/'2.png').write_bytes(b'')
    t0 = time.time()
    rc, out, err = cli(capsys, 'meta', 'train', *FOLDER, '--root', root, '--out', tmp_path/'x')
    assert rc == 2 and '2 of 18 omniglot images failed the input check' in err and one_error(err), err
    assert 'B/c2/1.png' in err and 'C/c1/2.png' in err                      # every bad file named at once
    assert time.time() - t0 < 30
    assert not (tmp_path/'x').exists()


def test_a_diverging_run_of_a_sweep_is_named(tmp_path):
    "A `TrainingError` inside `run_experiment` names the run folder (variant, seed) that diverged."
    from medssm.core import TrainingError
    from medssm.meta.train import run_experiment
    with pytest.raises(TrainingError, match=r'lazy_maml/seed1: meta-batch: task \d+ has a non-finite support loss'):
        run_experiment('sinusoid', 'sinusoid', quick=True, only=['lazy_maml'], baseline=False, seeds=[1, 2], inner_lr=1e4,
                       iterations=5, eval_tasks=5, out=tmp_path)
