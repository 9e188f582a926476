"""Paper 2 through the console script: `medssm seg train|eval|ladder`, `medssm bench seg --json`, the options generated
from the configs (old flags kept as aliases), and the errors a user sees for bad data folders. The run-folder
guarantees (exact eval, crafted checkpoints, refused resumes, locks) are in tests/test_seg_runs.py."""
import contextlib, io, json
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from test_seg_runs import cli          # `medssm ...` in this process: (exit status, stdout, stderr, progress lines)

QUICK = ['--quick', '--patients', '4', '--phantom-size', '48', '64', '--size', '32', '--epochs', '2']


def test_train_then_eval_on_phantoms(tmp_path):
    import torch; torch.set_num_threads(1)
    rc, out, err, logs = cli('seg', 'train', *QUICK, '--model', 'lighter_unet@4', '--out', tmp_path, '--json')
    assert rc == 0, err
    summary = json.loads(out)
    run = tmp_path/'lighter_unet@4_seed0'
    assert summary['run'] == str(run) and summary['params'] > 0 and summary['epochs'] == 2 and 0 <= summary['test_dice'] <= 1
    assert (run/'checkpoints'/'best.pt').is_file() and (run/'test_cases.csv').is_file() and (run/'test_metrics.json').is_file()
    assert len((run/'metrics.jsonl').read_text().splitlines()) == 2
    assert 'checked 8 image/mask pairs' in logs
    rc, out, err, logs = cli('seg', 'eval', '--run', run, '--json')                           # fp32: the stored scores
    assert rc == 0, err
    ev = json.loads(out)
    assert ev['n'] == summary['n_test'] and ev['path'] == 'fp32' and ev['dice'] == summary['test_dice']
    assert (run/'eval_test_fp32.csv').is_file() and (run/'eval_test_fp32.json').is_file()
    rc, out, err, logs = cli('seg', 'eval', '--run', run, '--path', 'auto', '--json')        # the parity-gated path
    auto = json.loads(out)
    assert rc == 0 and auto['path'] in ('fp32', 'bf16_cl', 'fp32_cl', 'onnx') and (run/'inference.json').is_file()
    assert auto['path'] == 'fp32' or auto['parity']['parity'][auto['path']]['mask_dice'] >= 0.999
    rc, out, err, logs = cli('seg', 'eval', '--run', run, '--data', 'phantoms', '--patients', '3', '--phantom-size', '48', '64',
                             '--phantom-seed', '5', '--subset', 'all', '--json')              # other data, said so
    other = json.loads(out)
    assert rc == 0 and other['own_data'] is False and other['n'] == 6 and 'OTHER data' in logs


def test_ladder_writes_its_tables_and_one_run_per_rung(tmp_path):
    rc, out, err, logs = cli('seg', 'ladder', *QUICK, '--epochs', '1', '--width', '4', '--model', 'lighter_unet@4',
                             '--seeds', '0', '--out', tmp_path, '--json')
    assert rc == 0, err
    table = json.loads(out)
    assert [r['rung'] for r in table][0] == 'baseline' and len(table) == 7
    assert (tmp_path/'ladder.csv').is_file() and (tmp_path/'ladder_per_seed.csv').is_file()
    runs = sorted(tmp_path.glob('*/lighter_unet@4_seed0/run.json'))
    assert len(runs) == 7 and all(json.loads(r.read_text())['data']['source'] == 'phantoms' for r in runs)


def test_old_flags_still_work_and_help_shows_the_recipe():
    from medssm.cli import build_parser, load_modules, options_from_args
    load_modules(['medssm.seg.cli'])
    p = build_parser(['seg'])
    a = p.parse_args(['seg', 'train', '--epochs', '7', '--batch-size', '2', '--weight-decay', '0', '--loss', 'bce',
                      '--seed', '3', '--lr', '0.01', '--patience', '4', '--quick', '--patients', '9'])
    o = options_from_args(a.cmd.options, a)
    assert (o.seg.fit.max_epochs, o.seg.fit.batch_size, o.seg.fit.weight_decay, o.seg.loss, o.seg.fit.seed, o.seg.fit.lr,
            o.seg.fit.early_stop_patience, o.quick, o.dataset.patients) == (7, 2, 0.0, 'bce', 3, 0.01, 4, True, 9)
    text = ' '.join(_help(p).split())
    for flag in ('--model', '--max-epochs', '--epochs', '--lr', '--weight-decay', '--seed', '--data', '--split-seed', '--threads', '--json'):
        assert flag in text, flag
    assert 'learning rate (default: 0.0001)' in text and 'training size S×S in pixels (Sec. 3.1) (default: 256)' in text


def _help(p):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try: p.parse_args(['seg', 'train', '--help'])
        except SystemExit: pass
    return out.getvalue()


def test_bench_json_records():
    rc, out, err, logs = cli('bench', 'seg', '--json', '--models', 'lighter_unet@4', '--size', '32', '--repeats', '1',
                             '--width', '8', '--threads', '1')
    assert rc == 0, err
    recs = json.loads(out)
    assert isinstance(recs, list) and len(recs) == 1
    rec = recs[0]
    assert {'model', 'params', 'macs', 'ms', 'peak_mb'} <= set(rec) and rec['isolated'] is True   # its own process
    assert rec['model'] == 'lighter_unet@4' and rec['macs'] > 0 and rec['ms'] > 0 and rec['peak_mb'] >= 0
    assert rec['onnx_max_abs_diff'] < 1e-5 and rec['ms'] == min(rec[f'ms_{p}'] for p in ('fp32', 'fp32_cl', 'bf16_cl', 'onnx'))


def test_bench_runs_every_variant_by_default(monkeypatch):
    import medssm.seg.cli as seg_cli
    seen = []
    monkeypatch.setattr(seg_cli, 'bench_models', lambda variants, **kw: seen.extend(variants) or
                        [dict(model=v, params=1, macs=1, ms=1.0, peak_mb=0.0, path='fp32') for v in variants])
    rc, out, err, logs = cli('bench', 'seg', '--json')
    assert rc == 0, err
    assert seen == seg_cli.UNET_VARIANTS + seg_cli.BASELINES and len(seen) == 15


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
    ('empty', 'is empty'), ('unreadable', 'not a readable image')])
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
        SegDataset(scan_dataset(root)).validate()
    assert 'p1' in str(e.value)                                   # the message names the file


def test_sixteen_bit_images_keep_their_range(tmp_path):
    from medssm.seg.data import scan_dataset, SegDataset
    root = _folder(tmp_path/'data', n=1)
    ramp = (np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)            # up to 64,773: a 16-bit image
    Image.fromarray(ramp).save(root/'images'/'p0.png')
    x = SegDataset(scan_dataset(root), size=40)[0]['image']
    assert x.shape == (3, 40, 40) and 0.9 < float(x.max()) <= 1.0              # not clipped at 255/65535


def test_cli_error_exit_code(tmp_path):
    rc, out, err, logs = cli('seg', 'train', '--data', tmp_path/'nope', '--quick')
    assert rc == 2 and 'nope' in err and 'Traceback' not in err
    rc, out, err, logs = cli('seg', 'eval', '--run', tmp_path)
    assert rc == 2 and 'not a run folder' in err
    rc, out, err, logs = cli('seg', 'eval')
    assert rc == 2 and '--run' in err
