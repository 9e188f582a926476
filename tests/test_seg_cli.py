"""Paper 2 end to end through the console script: `medssm seg train|eval|ladder`, `medssm bench seg --json`, and the
errors a user sees for bad data folders."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MEDSSM_QUICK': '1', 'PYTHONPATH': str(ROOT)}
QUICK = ['--quick', '--patients', '5', '--epochs', '2', '--size', '32']


def medssm(*args, check=True):
    "The console script in a fresh process."
    r = subprocess.run([sys.executable, '-c', 'import sys; from medssm.cli import main; sys.exit(main())', *map(str, args)],
                       env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if check: assert r.returncode == 0, r.stderr[-3000:]
    return r


def medssm_here(capsys, *args):
    "The console script's `main` in this process (saves an interpreter start): (exit code, stdout, stderr)."
    from medssm.cli import main
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_train_then_eval_on_phantoms(tmp_path, capsys, monkeypatch):
    r = medssm('seg', 'train', *QUICK, '--model', 'lighter_unet@4', '--out', tmp_path)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    run = tmp_path/'lighter_unet@4_seed0'
    assert summary['params'] > 0 and summary['epochs'] == 2 and 0 <= summary['test_dice'] <= 1
    assert (run/'checkpoints'/'best.pt').is_file() and (run/'test_cases.csv').is_file()
    assert len((run/'metrics.jsonl').read_text().splitlines()) == 2
    monkeypatch.chdir(tmp_path)
    rc, out, err = medssm_here(capsys, 'seg', 'eval', '--quick', '--patients', '5', '--run', run, '--path', 'fp32')
    assert rc == 0, err
    ev = json.loads(out.strip().splitlines()[-1])
    assert ev['n'] == summary['n_test'] and ev['path'] == 'fp32'
    assert ev['dice'] == pytest.approx(summary['test_dice'], abs=1e-6)     # same model, same post-processing
    assert (run/'eval_fp32.csv').is_file()
    rc, out, err = medssm_here(capsys, 'seg', 'eval', '--quick', '--patients', '5', '--run', run)    # default: fastest path
    auto = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and auto['path'] in ('bf16_cl', 'fp32_cl', 'onnx') and auto['dice'] == pytest.approx(ev['dice'], abs=0.05)


def test_bench_json_records(capsys):
    rc, out, err = medssm_here(capsys, 'bench', 'seg', '--json', '--models', 'lighter_unet@4', '--size', '32', '--repeats', '1',
                               '--width', '8', '--threads', '1')
    assert rc == 0, err
    recs = json.loads(out)
    assert isinstance(recs, list) and len(recs) == 1
    rec = recs[0]
    assert {'model', 'params', 'macs', 'ms', 'peak_mb'} <= set(rec)
    assert rec['model'] == 'lighter_unet@4' and rec['macs'] > 0 and rec['ms'] > 0 and rec['peak_mb'] >= 0
    assert rec['onnx_max_abs_diff'] < 1e-5 and rec['ms'] == min(rec[f'ms_{p}'] for p in ('fp32', 'fp32_cl', 'bf16_cl', 'onnx'))


def _folder(root, n=3):
    rng = np.random.default_rng(0)
    for d in ('images', 'masks'): (root/d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root/'images'/f'p{i}.png')
        m = np.zeros((40, 60), np.uint8); m[10:20, 10:30] = 255
        Image.fromarray(m).save(root/'masks'/f'p{i}.png')
    return root


@pytest.mark.parametrize('breakage, expected', [
    ('missing', 'no mask for image'), ('nonbinary', 'is not binary'), ('size', 'has size'),
    ('empty', 'is empty'), ('unreadable', 'cannot read image')])
def test_bad_folders_give_one_clear_error(tmp_path, breakage, expected):
    root = _folder(tmp_path/'data')
    if breakage == 'missing': (root/'masks'/'p1.png').unlink()
    if breakage == 'nonbinary': Image.fromarray(np.arange(2400, dtype=np.uint8).reshape(40, 60)).save(root/'masks'/'p1.png')
    if breakage == 'size': Image.fromarray(np.full((20, 20), 255, np.uint8)).save(root/'masks'/'p1.png')
    if breakage == 'empty': Image.fromarray(np.zeros((40, 60), np.uint8)).save(root/'masks'/'p1.png')
    if breakage == 'unreadable': (root/'images'/'p1.png').write_bytes(b'not a png')
    from medssm.seg.data import scan_dataset, SegDataset
    from medssm.core import InputError
    with pytest.raises(InputError, match=expected) as e:
        ds = SegDataset(scan_dataset(root))
        for i in range(len(ds)): ds.original(i)
    assert 'p1' in str(e.value)                                   # the message names the file


def test_cli_error_exit_code(tmp_path, capsys):
    rc, out, err = medssm_here(capsys, 'seg', 'train', '--data', tmp_path/'nope', '--quick')
    assert rc == 2 and 'nope' in err and 'Traceback' not in err
    rc, out, err = medssm_here(capsys, 'seg', 'eval', '--run', tmp_path, '--quick')
    assert rc == 2 and 'seg_config.json' in err
