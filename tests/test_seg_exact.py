"""Paper 2, issue 14: exact evaluation and inference, resizing that keeps masks in place, 16-bit images, the parity
gate, `seg predict` / `seg export` / `seg compare` / `seg sweep`, folder layouts, spacing, post-processing choices,
and the last-batch-of-one guard. Commands run in this process through `medssm.cli.main` (see test_seg_runs.cli)."""
import json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_seg_runs import cli, one_error_line, TINY

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A finished 3-epoch run on tiny phantoms (lr 3e-3 so that its masks are not empty)."
    out = tmp_path_factory.mktemp('seg_exact')
    rc, stdout, err, _ = cli('seg', 'train', *TINY, '--epochs', '3', '--lr', '0.003', '--out', out, '--json')
    assert rc == 0, err
    return out/'r', json.loads(stdout)


def test_eval_equals_stored_test_metrics_and_default_path_is_fp32(trained):
    run, _ = trained
    rc, out, err, logs = cli('seg', 'eval', '--run', run, '--json')
    assert rc == 0, err
    ev, stored = json.loads(out), json.loads((run/'test_metrics.json').read_text())
    assert ev['path'] == 'fp32' and {k: ev[k] for k in stored} == stored and ev['reproduces_test_metrics'] is True
    # the default Predictor is fp32: bit-identical to the engine's predict on the trained checkpoint
    from medssm.runs import load_run
    from medssm.seg.data import SegDataset
    from medssm.seg.deploy import Predictor
    from medssm.seg.train import predict_probs
    loaded = load_run(run)
    ds = SegDataset(loaded.dataset().select(loaded.split['test']), loaded.config.size)
    pred = Predictor(loaded.model, size=loaded.config.size)
    assert pred.path == 'fp32'
    np.testing.assert_array_equal(predict_probs(loaded.model, ds, predictor=pred), predict_probs(loaded.model, ds))


def test_mask_resizing_keeps_the_centroid():
    from medssm.seg.data import to_network, fit_box
    rng, offsets = np.random.default_rng(1), []
    for H, W, S, mode in [(380, 646, 256, 'stretch'), (432, 646, 128, 'stretch'), (380, 646, 256, 'letterbox')] * 8:
        cy, cx, r = rng.uniform(0.3, 0.7) * H, rng.uniform(0.3, 0.7) * W, rng.uniform(0.06, 0.15) * min(H, W)
        yy, xx = np.mgrid[:H, :W]
        m = (yy - cy) ** 2 + ((xx - cx) * 0.7) ** 2 <= r ** 2
        _, y = to_network(np.zeros((H, W, 3), np.uint8), m, S, mode)
        nh, nw, top, left = fit_box(H, W, S, mode)
        expect = (np.argwhere(m).mean(0) + 0.5) * [nh / H, nw / W] - 0.5 + [top, left]
        offsets.append(np.argwhere(y[0].numpy() > 0).mean(0) - expect)
    offsets = np.array(offsets)
    assert np.abs(offsets.mean(0)).max() < 0.1          # no shift
    assert np.abs(offsets).max() < 0.25                 # each mask: grid quantisation only


def test_sixteen_bit_png_reads_with_its_range(tmp_path):
    from medssm.seg.data import load_cases, SegDataset
    (tmp_path/'images').mkdir(); (tmp_path/'mask').mkdir()                  # the reference code's folder name
    ramp = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)      # up to 64,491: far above 255
    Image.fromarray(ramp).save(tmp_path/'images'/'a.png')
    m = np.zeros((48, 64), np.uint16); m[10:30, 20:40] = 65535
    Image.fromarray(m).save(tmp_path/'mask'/'a.png')                         # a 16-bit mask too
    ds = SegDataset(load_cases(str(tmp_path)), size=48)
    img, mask = ds.original(0)
    assert img.dtype == np.uint16 and int(img.max()) == int(ramp.max()) and mask.sum() == 400
    x = ds[0]['image']
    assert 0.9 < float(x.max()) <= 1.0 and float(x.min()) < 0.01 and len(np.unique(x.numpy())) > 1000   # not saturated at 255


def _shift_onnx(monkeypatch):
    "Make the 'onnx' path a broken one: its probabilities inverted (every mask changes)."
    import medssm.seg.deploy as deploy
    real = deploy._runner
    def runner(model, path, size, device):
        run = real(model, 'fp32', size, device)
        return run if path != 'onnx' else (lambda x: 1 - run(x))
    monkeypatch.setattr(deploy, '_runner', runner)


def test_parity_gate_rejects_a_path_that_changes_masks(trained, tmp_path, monkeypatch):
    import shutil
    from medssm.seg.deploy import evaluate_seg_run, run_inference_path
    run = tmp_path/'r'; shutil.copytree(trained[0], run)
    _shift_onnx(monkeypatch)
    gate = run_inference_path(run)
    assert gate['parity']['onnx']['passed'] is False and gate['parity']['onnx']['mask_dice'] < 0.999
    assert gate['path'] != 'onnx' and 'onnx' not in gate['ms'] and gate['checked_on'] > 0
    summary, _ = evaluate_seg_run(run, path='auto')
    assert summary['path'] == gate['path'] and summary['parity'] == gate
    stored = json.loads((run/'inference.json').read_text())
    assert list(stored.values())[0]['path'] == gate['path']                  # recorded in the run, read back next time


def test_explicit_path_reports_its_cost(trained):
    run, _ = trained
    rc, out, err, _ = cli('seg', 'eval', '--run', run, '--path', 'fp32_cl', '--json')
    ev = json.loads(out)
    assert rc == 0 and ev['path'] == 'fp32_cl' and abs(ev['dice'] - ev['dice_fp32']) < 1e-3 and ev['max_abs_prob_diff'] < 1e-4


def test_predict_writes_masks_at_original_size_overlays_and_areas(trained, tmp_path):
    run, _ = trained
    from medssm.seg.data import make_phantom
    src = tmp_path/'in'; src.mkdir()
    for i, (h, w) in enumerate([(45, 70), (60, 40)]):
        Image.fromarray(make_phantom(i, size=(h, w))[0]).save(src/f'scan{i}.png')
    Image.fromarray((np.full((30, 50), 40000, np.uint16))).save(src/'deep16.png')              # 16-bit input
    (src/'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    out = tmp_path/'pred'
    rc, stdout, err, logs = cli('seg', 'predict', '--run', run, src, tmp_path/'absent.png', '--out', out, '--spacing', '0.1', '0.2', '--json')
    assert rc == 2, err                                                       # some files failed: exit 2, the rest written
    rows = {r['name']: r for r in json.loads(stdout)}
    assert set(rows) == {'broken', 'deep16', 'scan0', 'scan1', 'absent'}
    assert Image.open(out/'masks'/'scan0.png').size == (70, 45) and Image.open(out/'masks'/'scan1.png').size == (40, 60)
    assert Image.open(out/'masks'/'deep16.png').size == (50, 30) and (out/'overlays'/'scan1.png').is_file()
    assert set(np.unique(np.asarray(Image.open(out/'masks'/'scan0.png')))) <= {0, 255}
    assert rows['scan0']['area_mm2'] == pytest.approx(rows['scan0']['area_px'] * 0.02)
    assert 'broken.png' in rows['broken']['error'] and 'absent.png' in rows['absent']['error'] and rows['scan1']['error'] == ''
    errors = {l for l in (err + logs).splitlines() if l.startswith('error: ')}
    assert any('broken.png' in l for l in errors) and any('absent.png' in l for l in errors)
    csv = pd.read_csv(out/'areas.csv', keep_default_na=False)
    assert len(csv) == 5 and not list(out.rglob('.*.tmp'))                   # written atomically: no temporary files left
    # the masks are those of the fp32 evaluation: same probabilities, same post-processing
    from medssm.runs import load_run
    from medssm.seg.data import to_network
    from medssm.seg.metrics import postprocess
    loaded = load_run(run)
    img = np.asarray(Image.open(src/'scan0.png').convert('RGB'))
    with torch.no_grad(): p = torch.sigmoid(loaded.model(to_network(img, None, loaded.config.size)[0][None]))[0, 0].numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(out/'masks'/'scan0.png')) > 0, postprocess(p, img.shape[:2]))


def test_export_and_compare(trained, tmp_path):
    run, _ = trained
    rc, out, err, _ = cli('seg', 'export', '--run', run, '--out', tmp_path/'m.onnx', '--json')
    assert rc == 0, err
    assert json.loads(out)['max_abs_prob_diff'] < 1e-5 and (tmp_path/'m.onnx').stat().st_size > 10_000
    a = pd.read_csv(run/'test_cases.csv')
    b = a.assign(dice=a.dice * 0.5, hd95=a.hd95 + 3); b.to_csv(tmp_path/'b.csv', index=False)
    rc, out, err, _ = cli('seg', 'compare', '--runs', run, tmp_path/'b.csv', '--metrics', 'dice', 'hd95', '--json')
    res = {r['metric']: r for r in json.loads(out)}
    assert rc == 0 and res['hd95']['median_diff'] == pytest.approx(-3) and res['dice']['n'] == len(a)
    rc, out, err, _ = cli('seg', 'compare', '--runs', run)
    assert rc == 2 and one_error_line(err) and 'exactly two' in err


def test_sweep_selects_weight_decay_on_validation(tmp_path):
    rc, out, err, _ = cli('seg', 'sweep', *TINY[:-2], '--epochs', '1', '--grid', '0.01', '0', '--seeds', '0', '--out', tmp_path, '--json')
    assert rc == 0, err
    res = json.loads(out)
    val = pd.read_csv(tmp_path/'sweep_val.csv')
    best = val.groupby('weight_decay', sort=False).val_dice.mean().idxmax()   # ties: the first of the grid
    assert res['selected'] == best and {r['weight_decay'] for r in res['test']} == {best}
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ['lighter_unet@4_seed0_wd0', 'lighter_unet@4_seed0_wd0.01']


def test_split_layout_and_spacing_give_the_folders_split_and_mm(tmp_path):
    from medssm.seg.data import write_phantom_folder, load_cases, split_names
    root = write_phantom_folder(tmp_path/'data', 5, seed=2, layout='split', size=(48, 64))
    (root/'spacing.csv').write_text('image,spacing\n' + ''.join(f'{p.stem},0.5\n' for p in root.rglob('images/*.png')))
    cases = load_cases(str(root))
    split = split_names(cases, seed=123)                                      # the folders decide, not the seed
    assert all(n.startswith(f'{k}/') for k, names in split.items() for n in names) and all(split.values())
    rc, out, err, _ = cli('seg', 'train', '--data', root, *TINY[6:], '--size', '32', '--epochs', '1', '--out', tmp_path/'runs', '--json')
    assert rc == 0, err
    metrics = json.loads((tmp_path/'runs'/'r'/'test_metrics.json').read_text())
    assert metrics['unit'] == 'mm' and json.loads((tmp_path/'runs'/'r'/'run.json').read_text())['split'] == split


def test_postprocessing_and_letterbox_are_switches(trained, tmp_path):
    from medssm.seg.metrics import postprocess, n_components
    prob = np.zeros((32, 32), np.float32); prob[2:10, 2:10] = 0.9; prob[20:24, 20:24] = 0.9      # two lesions
    assert n_components(postprocess(prob)) == 1 and n_components(postprocess(prob, components='all')) == 2
    run, _ = trained
    rc, out, err, _ = cli('seg', 'eval', '--run', run, '--components', 'all', '--json')
    ev = json.loads(out)
    assert rc == 0 and ev['components'] == 'all' and (run/'eval_test_fp32_all.csv').is_file()
    rc, out, err, _ = cli('seg', 'train', *TINY, '--resize', 'letterbox', '--components', 'all', '--epochs', '1',
                          '--out', tmp_path, '--json')
    assert rc == 0, err
    cfg = json.loads((tmp_path/'r'/'config.json').read_text())
    assert (cfg['resize'], cfg['components']) == ('letterbox', 'all')
    rc, out, err, _ = cli('seg', 'eval', '--run', tmp_path/'r', '--json')
    assert json.loads(out)['reproduces_test_metrics'] is True


def test_last_batch_of_one_trains_deeplab():
    from medssm.seg.data import phantom_cases, split_cases
    from medssm.seg.train import quick_config, train_seg
    tr, va, _ = split_cases(phantom_cases(6, seed=0, size=(48, 64)), seed=0)
    res = train_seg(quick_config(model='deeplabv3plus_mobilenet', max_epochs=1, batch_size=len(tr) - 1, size=32), tr, va)
    assert len(res.history) == 1 and np.isfinite(res.history[0]['train_loss'])


def test_recipe_flags_reach_the_config():
    from medssm.cli import build_parser, load_modules, options_from_args
    load_modules(['medssm.seg.cli'])
    a = build_parser(['seg']).parse_args(['seg', 'train', '--optimizer', 'sgd', '--momentum', '0', '--no-augment',
        '--plateau-factor', '0', '--early-stop-patience', '0', '--device', 'cpu', '--model', 'fcn8s', '--backbone-weights',
        'vgg.pth', '--normalize', 'imagenet', '--no-amp', '--num-workers', '2', '--resize', 'letterbox', '--split-seed', '4', '--seed', '9'])
    o = options_from_args(a.cmd.options, a)
    f = o.seg.fit
    assert (f.optimizer, f.momentum, f.plateau_factor, f.early_stop_patience, f.device, f.amp, f.num_workers) == ('sgd', 0.0, 0.0, 0, 'cpu', False, 2)
    assert (o.seg.augment, o.seg.backbone_weights, o.seg.normalize, o.seg.resize, o.dataset.split_seed, f.seed) == \
           (False, 'vgg.pth', 'imagenet', 'letterbox', 4, 9)
    from medssm.seg.train import LADDER, SegConfig
    assert LADDER[0][1]['momentum'] == 0.0 and SegConfig().fit.amp is True      # plain SGD rungs; AMP (CUDA only) on
