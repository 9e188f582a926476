"""Paper 1 with the tools pathologists already use (issue 13): CLAM/TRIDENT `.h5` files in any row order, CLAM and
reference checkpoints, foundation-model weights through the strict loader, annotations → patch labels → multitask
training from the command line, patient-grouped folds, the pen filter and tissue QC images."""
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import medssm.mil.cli                                   # registers the mil and wsi commands
from medssm.cli import main
from medssm.mil.data import read_bag
from medssm.mil.heatmaps import annotation_fractions, make_demo_data, read_annotation
from medssm.mil.wsi import demo_image, write_pyramid_tiff, DEMO_MPP
from test_mil_runs import run as cli, one_error_line   # `medssm` in-process, and its single error line

FAST = ['--extractor', 'resnet18_trunc', '--random-weights', '--num-workers', '0', '--batch-size', '16']


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    "The demo slide, its annotation and its features (128-px patches at 20x, ResNet18-layer3 with random weights)."
    d = tmp_path_factory.mktemp('demo')
    files = make_demo_data(d/'slides')
    assert main(['wsi', 'run', '--slides', str(d/'slides'), '--out', str(d/'wsi'), '--patch-size', '128', *FAST]) == 0
    return dict(dir=d, slide=files['slide'], geojson=files['geojson'], h5=d/'wsi'/'features'/'ihc_demo.h5')


def clam_copy(src:Path, dst:Path, attrs:bool=True, seed:int=0):
    "The same patches as CLAM stores them: rows in another order (column by column, then shuffled), int32 coords, and "
    "only CLAM's attributes (`patch_size` at `patch_level`) — or none at all, as in CLAM's feature files."
    with h5py.File(src) as f:
        feats, coords, ca = f['features'][:], f['coords'][:], dict(f['coords'].attrs)
    order = np.lexsort((coords[:, 1], coords[:, 0]))                    # x outer, y inner: CLAM's meshgrid(indexing='ij')
    order = order[np.random.default_rng(seed).permutation(len(order))] if seed else order
    with h5py.File(dst, 'w') as f:
        f['features'] = feats[order]
        c = f.create_dataset('coords', data=coords[order].astype(np.int32))
        if attrs:
            for k in ('patch_size', 'patch_level', 'downsample', 'downsampled_level_dim', 'level_dim', 'name'): c.attrs[k] = ca[k]
            c.attrs['save_path'] = str(dst.parent)
    return order


@pytest.fixture(scope='module')
def trained(demo, tmp_path_factory):
    "A multitask SSM-MIL trained from the command line on annotated slides made from the demo slide's features."
    d = tmp_path_factory.mktemp('bags')
    with h5py.File(demo['h5']) as f: feats, coords, ca = f['features'][:], f['coords'][:], dict(f['coords'].attrs)
    rng, rows = np.random.default_rng(0), []
    (d/'features').mkdir(); (d/'annotations').mkdir()
    for i in range(12):
        label = i % 2
        x = (feats + rng.normal(0, 0.1, feats.shape) + 0.5 * label).astype(np.float32)
        order = np.lexsort((coords[:, 1], coords[:, 0])) if i % 3 == 0 else np.arange(len(coords))   # some in CLAM's order
        with h5py.File(d/'features'/f's{i}.h5', 'w') as f:
            f['features'] = x[order]; c = f.create_dataset('coords', data=coords[order])
            for k, v in ca.items(): c.attrs[k] = v
        if label: (d/'annotations'/f's{i}.geojson').write_bytes(Path(demo['geojson']).read_bytes())
        rows.append(dict(slide_id=f's{i}', label=['normal', 'tumour'][label], case_id=f'p{i % 2}' if i < 4 else f'p{i}'))   # s0+s2, s1+s3: one patient each
    pd.DataFrame(rows).to_csv(d/'slides.csv', index=False)
    common = ['--slides', d/'slides.csv', '--features', d/'features', '--in-dim', feats.shape[1]]
    assert main([str(a) for a in ['mil', 'train', *common, '--annotations', d/'annotations', '--multitask',
                                  '--d-state', 8, '--epochs', 3, '--lr', 1e-3, '--out', d/'run']]) == 0
    return dict(dir=d, run=d/'run', common=common, coords=coords)


def test_annotations_give_patch_labels_and_multitask_trains(trained, demo, capsys):
    "--annotations → patch labels aligned with each bag's reading order → a multitask run; eval reproduces it, also "
    "on slides without annotations."
    from medssm.runs import Run, load_run
    from medssm.mil.train import same_metrics
    run = load_run(trained['run'])
    assert run.config.multitask and run.data['annotations'].endswith('annotations')
    ds = run.dataset()
    truth = annotation_fractions(read_annotation(demo['geojson']), read_bag(demo['h5']).coords, 256) >= 0.5
    for i in range(len(ds)):
        expected = truth if ds.labels[i] else np.zeros_like(truth)         # normal slides without a file: all 0
        assert np.array_equal(ds.patch_labels[i], expected.astype(np.int64)), ds.slide_ids[i]   # CLAM-ordered files too
    rc, out, err = cli(capsys, 'mil', 'eval', '--run', trained['run'], '--json', '--seed', 3)
    assert rc == 0 and same_metrics(json.loads(out), Run(trained['run']).test_metrics())
    rc, out, err = cli(capsys, 'mil', 'eval', '--run', trained['run'], *trained['common'][:4],   # no --annotations
                       '--patch-scores', '--out', trained['dir']/'ext', '--json')
    assert rc == 0 and json.loads(out)['test_acc'] >= 0
    scores = pd.read_csv(trained['dir']/'ext'/'patch_scores'/'s3.csv')          # s3 is stored in CLAM's order
    assert list(scores.columns) == ['row', 'x', 'y', 'score'] and scores.score.between(0, 1).all()
    with h5py.File(trained['dir']/'features'/'s3.h5') as f: assert np.array_equal(scores[['x', 'y']].values, f['coords'][:])
    rc, out, err = cli(capsys, 'mil', 'train', *trained['common'], '--multitask', '--out', trained['dir']/'nolabels')
    assert rc == 2 and '--annotations' in one_error_line(err) and not (trained['dir']/'nolabels').exists()


def test_row_order_never_changes_a_heatmap(trained, demo, capsys, tmp_path):
    "A CLAM .h5 (rows column by column and shuffled, CLAM's attributes) gives the same heatmap as ours, from a run "
    "(--run) and from `mil eval --patch-scores` files (--scores)."
    ours, clam = demo['h5'], tmp_path/'ihc_demo.h5'
    clam_copy(ours, clam, seed=7)
    maps = {}
    for name, h5 in (('ours', ours), ('clam', clam)):
        rc, out, err = cli(capsys, 'wsi', 'heatmap', '--slide', demo['slide'], '--features', h5, '--run', trained['run'],
                           '--out', tmp_path/name, '--top-k', 3)
        assert rc == 0, err
        maps[name] = np.asarray(Image.open(tmp_path/name/'overlay.png'))
    assert np.array_equal(maps['ours'], maps['clam'])
    by_xy = lambda p: pd.read_csv(p).set_index(['x', 'y']).score.sort_index()
    pd.testing.assert_series_equal(by_xy(tmp_path/'ours'/'scores.csv'), by_xy(tmp_path/'clam'/'scores.csv'))
    top = [pd.read_csv(tmp_path/n/'top_patches'/'top_patches.csv')[['x', 'y']].values for n in ('ours', 'clam')]
    assert np.array_equal(*top)
    # mil eval --patch-scores on a slide table of the CLAM file, then wsi heatmap --scores: the same map again
    (tmp_path/'t').mkdir(); (tmp_path/'t'/'ihc_demo.h5').write_bytes(clam.read_bytes())
    pd.DataFrame({'slide_id': ['ihc_demo'], 'label': ['tumour']}).to_csv(tmp_path/'t.csv', index=False)
    rc, out, err = cli(capsys, 'mil', 'eval', '--run', trained['run'], '--slides', tmp_path/'t.csv', '--features', tmp_path/'t',
                       '--patch-scores', '--out', tmp_path/'ev')
    assert rc == 0, err
    rc, out, err = cli(capsys, 'wsi', 'heatmap', '--slide', demo['slide'], '--features', clam, '--scores',
                       tmp_path/'ev'/'patch_scores'/'ihc_demo.npy', '--out', tmp_path/'from_scores', '--top-k', 0)
    assert rc == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path/'from_scores'/'overlay.png')), maps['ours'])


def test_clam_feature_file_as_clam_writes_it(trained, demo, capsys, tmp_path):
    "CLAM's own files: a patches .h5 with `patch_size` at `patch_level` and no `target_patch_size`, and a feature .h5 "
    "with no attributes at all (the side comes from the coordinate grid, or --patch-size-level0)."
    for attrs in (True, False):
        h5 = tmp_path/f'clam_{attrs}.h5'
        clam_copy(demo['h5'], h5, attrs=attrs)
        with h5py.File(h5) as f: assert 'target_patch_size' not in f['coords'].attrs and 'patch_size_level0' not in f['coords'].attrs
        rc, out, err = cli(capsys, 'wsi', 'heatmap', '--slide', demo['slide'], '--features', h5, '--run', trained['run'],
                           '--out', tmp_path/f'hm_{attrs}', '--top-k', 2)
        assert rc == 0, err
        assert Image.open(tmp_path/f'hm_{attrs}'/'top_patches'/pd.read_csv(tmp_path/f'hm_{attrs}'/'top_patches'/'top_patches.csv').file[0]).size == (256, 256)
    rc, out, err = cli(capsys, 'wsi', 'heatmap', '--slide', demo['slide'], '--features', tmp_path/'clam_False.h5',
                       '--run', trained['run'], '--out', tmp_path/'hm_given', '--patch-size-level0', 256, '--top-k', 0)
    assert rc == 0 and np.array_equal(np.asarray(Image.open(tmp_path/'hm_given'/'overlay.png')),
                                      np.asarray(Image.open(tmp_path/'hm_False'/'overlay.png')))


def test_clam_and_reference_checkpoints_load_from_the_cli(trained, demo, capsys, tmp_path):
    "A CLAM checkpoint (CLAM's parameter names) and a bare state dict of the SSM-MIL reference code, evaluated and "
    "mapped without a run folder; a checkpoint that does not fit fails with the list."
    from medssm.mil.models import create_model
    dim = read_bag(demo['h5']).features.shape[1]
    ours = create_model('clam_sb', 2, dim)
    names = {'fc.0.': 'attention_net.0.', 'attention.': 'attention_net.3.'}
    clam_sd = {next((v + k[len(p):] for p, v in names.items() if k.startswith(p)), k): t for k, t in ours.state_dict().items()}
    assert any(k.startswith('attention_net.3.attention_a.0') for k in clam_sd)
    torch.save(clam_sd, tmp_path/'s_0_checkpoint.pt')
    ev = ['mil', 'eval', *trained['common'][:4], '--patch-scores', '--json']
    rc, out, err = cli(capsys, *ev, '--weights', tmp_path/'s_0_checkpoint.pt', '--model', 'clam_sb', '--out', tmp_path/'e1')
    assert rc == 0, err
    assert len(pd.read_csv(tmp_path/'e1'/'predictions.csv')) == 12 and 'the checkpoint' in err
    rc, out, err = cli(capsys, 'wsi', 'heatmap', '--slide', demo['slide'], '--features', demo['h5'], '--weights',
                       tmp_path/'s_0_checkpoint.pt', '--model', 'clam_sb', '--out', tmp_path/'hm')
    assert rc == 0, err
    torch.save(create_model('ssm', 2, dim, d_state=8).state_dict(), tmp_path/'loss_0.1234.pt')    # the reference's file
    rc, out, err = cli(capsys, *ev, '--weights', tmp_path/'loss_0.1234.pt', '--d-state', 8, '--out', tmp_path/'e2')
    assert rc == 0, err
    rc, out, err = cli(capsys, *ev, '--weights', tmp_path/'loss_0.1234.pt', '--d-state', 16, '--out', tmp_path/'e3')
    assert rc == 2 and 'other shapes' in one_error_line(err)


def test_layerscale_vit_loads_completely_or_fails_loudly(capsys, tmp_path):
    "A UNI-style ViT checkpoint (LayerScale, register tokens): with the model's options every tensor loads and the "
    "features are the checkpoint model's; without them the run stops before any slide, naming the LayerScale weights."
    import timm
    from medssm.mil.wsi import PatchDataset, create_extractor, open_slide, patch_spec
    kw = {'init_values': 1e-5, 'reg_tokens': 4, 'img_size': 64, 'dynamic_img_size': True}
    torch.manual_seed(0)
    uni = timm.create_model('vit_tiny_patch16_224', num_classes=0, **kw).eval()
    with torch.no_grad():
        for n, p in uni.named_parameters():
            if n.endswith('gamma'): p.uniform_(0.5, 1.5)
    torch.save(uni.state_dict(), tmp_path/'pytorch_model.bin')
    d = tmp_path/'s'; d.mkdir()
    write_pyramid_tiff(d/'a.tiff', demo_image()[256:1792, 512:2048], mpp=DEMO_MPP)
    common = ['wsi', 'run', '--slides', d, '--magnification', 5, '--patch-size', 64, '--extractor', 'timm:vit_tiny_patch16_224',
              '--weights', tmp_path/'pytorch_model.bin', '--num-workers', 0]
    rc, out, err = cli(capsys, *common, '--out', tmp_path/'bad')
    assert rc == 2 and 'blocks.0.ls1.gamma' in one_error_line(err) and not list((tmp_path/'bad').glob('features/*.h5'))
    rc, out, err = cli(capsys, *common, '--extractor-kwargs', json.dumps(kw), '--out', tmp_path/'ok')
    assert rc == 0, err
    with h5py.File(tmp_path/'ok'/'features'/'a.h5') as f:
        feats, coords, attrs = f['features'][:], f['coords'][:], dict(f.attrs)
    assert json.loads(attrs['extractor_kwargs']) == kw and attrs['input_size'] == 64 and attrs['weights'].endswith('pytorch_model.bin')
    slide = open_slide(d/'a.tiff')
    patch = PatchDataset(d/'a.tiff', coords[:2], patch_spec(slide, 64, 5))
    ext = create_extractor('timm:vit_tiny_patch16_224', random_weights=True, kwargs=kw)   # for its preprocessing only
    with torch.no_grad(): ref = uni(ext.preprocess(torch.stack([patch[0], patch[1]]))).numpy()
    np.testing.assert_allclose(feats[:2], ref, atol=1e-4)


def test_grouped_folds_never_split_a_patient(capsys, tmp_path):
    "`mil cv` on a table with a case_id column: no patient's slides in two parts of any fold; a split CSV that splits "
    "a patient is refused."
    rows = []
    for i in range(30):
        patient = i // 3
        with h5py.File(tmp_path/f's{i}.h5', 'w') as f:
            f['features'] = np.random.default_rng(i).normal(size=(5, 4)).astype(np.float32) + patient % 2
        rows.append(dict(slide_id=f's{i}', label=patient % 2, case_id=f'patient{patient}'))
    table = pd.DataFrame(rows); table.to_csv(tmp_path/'slides.csv', index=False)
    common = ['--slides', tmp_path/'slides.csv', '--features', tmp_path, '--in-dim', 4]
    rc, out, err = cli(capsys, 'mil', 'cv', *common, '--model', 'meanpool_rf', '--n-estimators', 5, '--folds', 3,
                       '--out', tmp_path/'cv')
    assert rc == 0, err
    patient = dict(zip(table.slide_id, table.case_id))
    splits = sorted((tmp_path/'cv'/'splits').glob('fold*.csv'))
    assert len(splits) == 3
    for path in splits:
        split = pd.read_csv(path)
        owners = [{patient[s] for s in split[part].dropna()} for part in ('train', 'val', 'test')]
        assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2]), path
    bad = pd.read_csv(splits[0])
    moved = bad.test.dropna().iloc[0]                                           # one slide of a test patient …
    buddy = next(s for s in bad.train.dropna() if patient[s] != patient[moved])
    bad.loc[bad.test == moved, 'test'], bad.loc[bad.train == buddy, 'train'] = buddy, moved   # … swapped into train
    bad.to_csv(tmp_path/'leaky.csv', index=False)
    rc, out, err = cli(capsys, 'mil', 'train', *common, '--model', 'meanpool_rf', '--split', tmp_path/'leaky.csv',
                       '--out', tmp_path/'leak')
    assert rc == 2 and 'a patient must stay in one part' in one_error_line(err) and not (tmp_path/'leak').exists()


def test_clam_recipe_when_asked(capsys, tmp_path):
    "--recipe own trains CLAM with CLAM's settings (dropout 0.25, Adam without Lookahead, weight decay 1e-5, patience 20)."
    from medssm.runs import load_run
    small = ['--n-bags', '12', '--min-len', '10', '--max-len', '30', '--in-dim', '16', '--max-epochs', '1']
    rc, out, err = cli(capsys, 'mil', 'train', *small, '--model', 'clam_sb', '--recipe', 'own', '--out', tmp_path/'r')
    assert rc == 0, err
    cfg = load_run(tmp_path/'r').config
    assert (cfg.dropout, cfg.fit.weight_decay, cfg.fit.lookahead_k, cfg.fit.early_stop_patience) == (0.25, 1e-5, 0, 20)


def test_pen_marks_are_not_tissue(capsys, tmp_path):
    "Marker ink on a slide gets no patches, and the QC image shows what was removed."
    from PIL import ImageDraw
    img = Image.fromarray(demo_image()); draw = ImageDraw.Draw(img)
    draw.line([(100, 300), (3000, 2300)], fill=(20, 140, 60), width=400)              # a thick green stroke over glass and tissue
    d = tmp_path/'s'; d.mkdir(); write_pyramid_tiff(d/'inked.tiff', np.asarray(img), mpp=DEMO_MPP)
    for flag, name in (([], 'filtered'), (['--no-pen-filter'], 'raw')):
        assert cli(capsys, 'wsi', 'tile', '--slides', d, '--out', tmp_path/name, '--magnification', 10, '--min-tissue', 0.3, *flag)[0] == 0
    n = {name: len(h5py.File(tmp_path/name/'patches'/'inked.h5')['coords']) for name in ('filtered', 'raw')}
    assert n['filtered'] < n['raw']                                                    # the stroke on glass no longer counts
    qc = np.asarray(Image.open(tmp_path/'filtered'/'qc'/'inked.png'))
    assert qc.shape[2] == 3 and (np.abs(qc.astype(int) - [255, 0, 255]).sum(-1) < 200).sum() > 20   # magenta: removed ink
