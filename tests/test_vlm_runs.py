"""Paper 4 run folders: safe checkpoints, refused resumes, locked live runs, exact evaluation, checked inputs."""
import json, logging, os, shutil, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch

from medssm.cli import main

torch.set_num_threads(1)
QUICK = ['--quick', '--n-synth', '12', '--seed', '0', '--steps-per-epoch', '2', '--threads', '1']


def _run(capsys, *argv):
    "Run a command in-process: (exit status, stdout, stderr including the 'medssm' logger's progress lines)."
    log, h = logging.getLogger('medssm'), logging.StreamHandler(sys.stderr)
    log.addHandler(h); level = log.level; log.setLevel(logging.INFO)
    try: rc = main([str(a) for a in argv])
    finally: log.removeHandler(h); log.setLevel(level)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error(err:str)->str:
    "The single `error:` line of a refused command (and no traceback)."
    errors = [l for l in err.splitlines() if l.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in err, err
    return errors[0]


def _snapshot(folder:Path)->dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


class _Evil:
    "A pickle that writes a marker file when it is loaded."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    "One finished quick pre-training run (1 epoch); tests copy it before changing anything."
    run = tmp_path_factory.mktemp('vlm')/'run'
    assert main(['vlm', 'pretrain', *QUICK, '--epochs', '1', '--out', str(run), '--quiet']) == 0
    return run


def test_eval_reproduces_test_metrics_whatever_the_seed(finished, capsys):
    stored = json.loads((finished/'test_metrics.json').read_text())
    for seed in ('0', '123'):
        rc, out, err = _run(capsys, 'vlm', 'eval', '--run', finished, '--seed', seed, '--quick', '--n-synth', '40', '--json')
        assert rc == 0, err
        assert json.loads(out) == stored
        assert 'come from' in err and 'stored test split' in err and 'equal to the test metrics recorded' in err


def test_crafted_best_checkpoint_does_not_run_on_eval(finished, tmp_path, capsys):
    run = tmp_path/'run'; shutil.copytree(finished, run)
    marker = tmp_path/'pwned'
    torch.save({'model': {}, 'x': _Evil(marker)}, run/'checkpoints'/'best.pt')
    rc, out, err = _run(capsys, 'vlm', 'eval', '--run', run)
    assert rc == 2 and 'refused' in _one_error(err) and 'best.pt' in err
    assert not marker.exists()
    rc, out, err = _run(capsys, 'vlm', 'finetune', '--run', run, '--quick')
    assert rc == 2 and 'refused' in _one_error(err) and not marker.exists()


def test_crafted_last_checkpoint_does_not_run_on_resume(finished, tmp_path, capsys):
    run = tmp_path/'run'; shutil.copytree(finished, run)
    marker = tmp_path/'pwned'
    torch.save({'model': {}, 'x': _Evil(marker)}, run/'checkpoints'/'last.pt')
    rc, out, err = _run(capsys, 'vlm', 'pretrain', *QUICK, '--epochs', '2', '--out', run)
    assert rc == 2 and 'refused' in _one_error(err) and 'last.pt' in err
    assert not marker.exists()
    assert not (run/'.lock').exists()                    # the refused run released its folder


@pytest.mark.parametrize('change, names', [(['--image-arch', 'resnet50'], 'model.image_arch'),
                                           (['--n-synth', '14'], 'data fingerprint'),
                                           (['--image-size', '96'], 'image_size: 64 → 96'),
                                           (['--method', 'convirt'], 'method')])
def test_changed_resume_is_refused_and_changes_nothing(finished, tmp_path, capsys, change, names):
    run = tmp_path/'run'; shutil.copytree(finished, run)
    before = _snapshot(run)
    rc, out, err = _run(capsys, 'vlm', 'pretrain', *QUICK, '--epochs', '1', '--out', run, *change)
    assert rc == 2 and names in _one_error(err) and 'nothing was changed' in err
    assert _snapshot(run) == before


def test_second_live_pretrain_is_refused_at_once(tmp_path, capsys):
    run = tmp_path/'run'
    exe = Path(sys.executable).with_name('medssm')
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    first = subprocess.Popen([str(exe), 'vlm', 'pretrain', *QUICK, '--epochs', '100', '--out', str(run), '--quiet'],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (run/'.lock').exists():
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, 'the first run never locked its folder'
            time.sleep(0.2)
        t0 = time.time()
        rc, out, err = _run(capsys, 'vlm', 'pretrain', *QUICK, '--epochs', '100', '--out', run)
        assert rc == 2 and f'in use by process {first.pid}' in _one_error(err)
        assert time.time() - t0 < 30
    finally:
        first.kill(); first.wait()


@pytest.mark.parametrize('flags, flag', [(['--image-size', '0'], '--image-size 0'), (['--batch-size', '0'], '--batch-size 0'),
                                         (['--n-synth', '3'], '--n-synth 3'), (['--joint-dim', '0'], '--joint-dim 0'),
                                         (['--method', 'clip'], '--method'), (['--lr', '-1'], '--lr -1'),
                                         (['--image-arch', 'vit'], '--image-arch'), (['--max-words', '-2'], '--max-words -2')])
def test_bad_values_exit_2_with_one_line(tmp_path, capsys, flags, flag):
    rc, out, err = _run(capsys, 'vlm', 'pretrain', '--out', tmp_path/'run', *flags)
    assert rc == 2 and _one_error(err).startswith(f'error: {flag}')
    assert not (tmp_path/'run').exists()


def test_bad_input_file_fails_before_training(tmp_path, capsys):
    from test_vlm import _fake_openi
    xml_dir, png_dir = _fake_openi(tmp_path/'openi', 12)
    (png_dir/'CXR5_IM-1.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    t0 = time.time()
    rc, out, err = _run(capsys, 'vlm', 'pretrain', '--quick', '--data', 'openi', '--xml-dir', xml_dir, '--image-dir', png_dir,
                        '--out', tmp_path/'run')
    assert rc == 2 and 'CXR5_IM-1.png: not a readable image' in _one_error(err)
    assert '1 of 12 image–report pairs failed the input check' in err
    assert not (tmp_path/'run').exists() and time.time() - t0 < 30
