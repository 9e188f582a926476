"""Whole-slide pipeline through the `medssm` command line: a batch with broken slides, CLAM .h5 layout, tile then
extract, resume after the process is killed, two processes sharing one output folder."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile

import medssm.mil.cli                                   # registers the wsi (and mil) commands
from medssm.cli import main
from medssm.mil.wsi import demo_image, make_demo_slide, write_pyramid_tiff

# the command line in a fresh process; medssm.mil.cli is imported first, whatever medssm.cli.GROUPS says
MEDSSM = [sys.executable, '-c', 'import sys, medssm.mil.cli; from medssm.cli import main; sys.exit(main())']
FAST = ['--extractor', 'resnet18_trunc', '--random-weights', '--num-workers', '1', '--batch-size', '8']


def cli(*args)->int:
    "The same command line, in-process."
    return main([str(a) for a in args])


def corrupt_tiles(path, pages=(0, 1, 2)):
    "Overwrite the JPEG data of every tile of `pages` (the lowest level stays readable, so tissue is still found)."
    with tifffile.TiffFile(path) as t:
        spans = [(o, n) for i in pages for o, n in zip(t.pages[i].dataoffsets, t.pages[i].databytecounts)]
    with open(path, 'r+b') as f:
        for o, n in spans: f.seek(o + 2); f.write(b'\x00' * (n - 4))


@pytest.fixture(scope='module')
def batch(tmp_path_factory):
    d = tmp_path_factory.mktemp('slides')
    make_demo_slide(d/'ihc_demo.tiff')
    (d/'notaslide.svs').write_bytes(b'II*\x00' + os.urandom(200))                   # unopenable
    write_pyramid_tiff(d/'tiny.tiff', demo_image()[300:700, 600:1000], mpp=0.25, tile=64, min_side=400)  # < 1 patch
    make_demo_slide(d/'badtiles.tiff'); corrupt_tiles(d/'badtiles.tiff')           # opens, tiles undecodable
    write_pyramid_tiff(d/'blank.tiff', np.full((1024, 1024, 3), 240, np.uint8), mpp=0.5, tile=256)  # glass only
    return d


def test_batch_with_broken_slides(batch, tmp_path):
    assert cli('wsi', 'run', '--slides', batch, '--out', tmp_path, '--magnification', 10, *FAST) == 1  # the batch went on
    errs = pd.read_csv(tmp_path/'errors.csv').set_index('slide')
    assert sorted(errs.index) == ['badtiles', 'blank', 'notaslide', 'tiny']
    assert 'not a whole-slide image' in errs.error['notaslide'] and errs.stage['notaslide'] == 'open'
    assert 'smaller than one patch' in errs.error['tiny']
    assert 'cannot read the patch' in errs.error['badtiles'] and errs.stage['badtiles'] == 'read/extract'
    assert 'no tissue' in errs.error['blank']
    man = pd.read_csv(tmp_path/'manifest.csv').set_index('slide')
    assert man.status['ihc_demo'] == 'done' and (man.status == 'failed').sum() == 4
    # CLAM layout, readable by plain h5py
    with h5py.File(tmp_path/'features'/'ihc_demo.h5', 'r') as f:
        feats, coords = f['features'][:], f['coords'][:]
        assert feats.dtype == np.float32 and feats.shape == (man.n_patches['ihc_demo'], 256)
        assert coords.dtype == np.int64 and coords.shape == (len(feats), 2)
        c = f['coords'].attrs                   # CLAM: patch_size at patch_level; TRIDENT: the level-0 side
        assert (c['patch_size'], c['patch_level'], c['patch_size_level0']) == (256, 2, 1024)
        assert f.attrs['extractor'] == 'resnet18_trunc' and f.attrs['weights'] == 'random'
        assert np.isfinite(feats).all() and feats.std() > 0
    assert not list((tmp_path/'features').glob('.*.tmp'))
    # a slide without MPP is refused unless the user gives it
    d = tmp_path/'nompp'; d.mkdir()
    write_pyramid_tiff(d/'nompp.tiff', demo_image()[:1024, :1024], mpp=None)
    assert cli('wsi', 'tile', '--slides', d, '--out', tmp_path/'t1') == 1
    assert '--base-mpp' in pd.read_csv(tmp_path/'t1'/'errors.csv').error[0]
    assert cli('wsi', 'tile', '--slides', d, '--out', tmp_path/'t2', '--base-mpp', 0.5, '--min-tissue', 0.1) == 0


def test_tile_then_extract(tmp_path, capsys):
    d = tmp_path/'s'; d.mkdir(); make_demo_slide(d/'a.tiff')
    assert cli('wsi', 'extract', '--slides', d, '--out', tmp_path/'o', '--magnification', 10, *FAST) == 2  # no tiling yet
    assert 'wsi tile' in capsys.readouterr().err
    assert cli('wsi', 'tile', '--slides', d, '--out', tmp_path/'o', '--magnification', 10) == 0
    assert cli('wsi', 'extract', '--slides', d, '--out', tmp_path/'o', '--magnification', 10, *FAST) == 0
    with h5py.File(tmp_path/'o'/'patches'/'a.h5') as p, h5py.File(tmp_path/'o'/'features'/'a.h5') as f:
        assert 'features' not in p and np.array_equal(p['coords'][:], f['coords'][:])
    assert cli('wsi', 'extract', '--slides', d, '--out', tmp_path/'o', '--magnification', 20, *FAST) == 2
    assert 'other settings' in capsys.readouterr().err


def test_resume_after_kill(tmp_path):
    d = tmp_path/'s'; d.mkdir()
    make_demo_slide(d/'s0.tiff')
    for i in (1, 2, 3): (d/f's{i}.tiff').write_bytes((d/'s0.tiff').read_bytes())
    out = tmp_path/'o'
    args = [*MEDSSM, 'wsi', 'run', '--slides', str(d), '--out', str(out), '--magnification', '10', *FAST]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while not list((out/'features').glob('*.h5')) and time.time() - t0 < 240 and p.poll() is None: time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL); p.wait()              # kill the run and its DataLoader workers mid-batch
    done = sorted(f.name for f in (out/'features').glob('*.h5'))
    assert 1 <= len(done) < 4, f'kill came too late or too early: {done}'
    first = {n: (out/'features'/n).stat().st_mtime_ns for n in done}
    assert cli('wsi', 'run', '--slides', d, '--out', out, '--magnification', 10, *FAST) == 0
    assert sorted(f.name for f in (out/'features').glob('*.h5')) == [f's{i}.h5' for i in range(4)]
    assert all((out/'features'/n).stat().st_mtime_ns == t for n, t in first.items())   # finished slides skipped
    assert not list((out/'features').glob('.*.tmp'))                                  # stale temp files cleaned
    feats = [h5py.File(out/'features'/f's{i}.h5')['features'][:] for i in range(4)]
    for f in feats[1:]: np.testing.assert_array_equal(f, feats[0])                  # same slide → same features
    assert (pd.read_csv(out/'manifest.csv').status == 'done').all()


def test_ranks_share_the_slides(tmp_path, monkeypatch):
    "Under torchrun each rank takes every world-th slide; together they finish the folder and agree on the manifest."
    d = tmp_path/'s'; d.mkdir(); make_demo_slide(d/'a.tiff')
    for n in 'bcd': (d/f'{n}.tiff').write_bytes((d/'a.tiff').read_bytes())
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '1')
    assert cli('wsi', 'tile', '--slides', d, '--out', tmp_path/'o', '--magnification', 10) == 0
    assert sorted(p.stem for p in (tmp_path/'o'/'patches').glob('*.h5')) == ['b', 'd']
    assert (pd.read_csv(tmp_path/'o'/'manifest.csv').status == 'pending').sum() == 2
    monkeypatch.setenv('RANK', '0')
    assert cli('wsi', 'tile', '--slides', d, '--out', tmp_path/'o', '--magnification', 10) == 0
    assert (pd.read_csv(tmp_path/'o'/'manifest.csv').status == 'done').all()


def test_heatmap_of_a_trained_mil_run(tmp_path):
    "`medssm mil train` on .h5 features, then `medssm wsi heatmap --run` over the demo slide: PNG, GeoJSON, CSV."
    d = tmp_path/'s'; d.mkdir(); make_demo_slide(d/'demo.tiff')
    assert cli('wsi', 'run', '--slides', d, '--out', tmp_path/'o', '--magnification', 10, *FAST) == 0
    with h5py.File(tmp_path/'o'/'features'/'demo.h5') as f: feats, coords = f['features'][:], f['coords'][:]
    rng, rows = np.random.default_rng(0), []
    (tmp_path/'bags').mkdir()
    for i in range(10):                                      # slides made from the demo features; label shifts them
        label = i % 2
        with h5py.File(tmp_path/'bags'/f'b{i}.h5', 'w') as f:
            f['features'] = (feats + rng.normal(0, 0.1, feats.shape) + label).astype(np.float32); f['coords'] = coords
        rows.append(dict(slide_id=f'b{i}', label=label))
    pd.DataFrame(rows).to_csv(tmp_path/'slides.csv', index=False)
    assert cli('mil', 'train', '--slides', tmp_path/'slides.csv', '--features', tmp_path/'bags', '--model', 'clam_sb',
               '--in-dim', feats.shape[1], '--epochs', 1, '--patience', 0, '--out', tmp_path/'run') == 0
    assert cli('wsi', 'heatmap', '--slide', d/'demo.tiff', '--features', tmp_path/'o'/'features'/'demo.h5',
               '--run', tmp_path/'run', '--out', tmp_path/'hm') == 0
    scores = pd.read_csv(tmp_path/'hm'/'scores.csv')
    assert len(scores) == len(coords) and scores.score.between(0, 1).all()   # class probabilities per patch, fixed scale
    assert (tmp_path/'hm'/'heatmap.png').stat().st_size > 1000
    assert json.loads((tmp_path/'hm'/'regions.geojson').read_text())['type'] == 'FeatureCollection'
    assert cli('wsi', 'heatmap', '--slide', d/'demo.tiff', '--features', tmp_path/'o'/'features'/'demo.h5',
               '--out', tmp_path/'hm2') == 2                   # neither --run, --weights nor --scores
    assert (tmp_path/'o'/'qc'/'demo.png').exists()           # the tissue QC image of the slide


def test_two_processes_share_an_output_folder(tmp_path):
    "Two `wsi run` on one folder claim slides (a FileLock per slide): every slide is processed once, none twice."
    d = tmp_path/'s'; d.mkdir(); make_demo_slide(d/'s0.tiff')
    for i in range(1, 6): (d/f's{i}.tiff').write_bytes((d/'s0.tiff').read_bytes())
    out = tmp_path/'o'
    args = [*MEDSSM, 'wsi', 'run', '--slides', str(d), '--out', str(out), '--magnification', '10', *FAST]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    done = [[l.split(':')[0] for l in log.splitlines() if l.endswith(': done')] for log in logs]
    assert sorted(done[0] + done[1]) == [f's{i}.tiff' for i in range(6)], logs   # each slide by exactly one process
    assert sorted(f.name for f in (out/'features').iterdir()) == [f's{i}.h5' for i in range(6)]   # no claims left
    assert (pd.read_csv(out/'manifest.csv').status == 'done').all()


def test_a_claimed_slide_is_left_to_its_owner(tmp_path):
    "A slide whose claim a live process holds is skipped (pending), and processed once that process is gone."
    d = tmp_path/'s'; d.mkdir(); make_demo_slide(d/'a.tiff'); (d/'b.tiff').write_bytes((d/'a.tiff').read_bytes())
    out = tmp_path/'o'; (out/'patches').mkdir(parents=True)
    owner = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    try:
        (out/'patches'/'.b.lock').write_text(f'{owner.pid} elsewhere\n')         # another process is on slide b
        assert cli('wsi', 'tile', '--slides', d, '--out', out, '--magnification', 10) == 0
        assert sorted(p.name for p in (out/'patches').glob('*.h5')) == ['a.h5']
        man = pd.read_csv(out/'manifest.csv').set_index('slide')
        assert (man.status['a'], man.status['b']) == ('done', 'pending')
    finally: owner.kill(); owner.wait()
    assert cli('wsi', 'tile', '--slides', d, '--out', out, '--magnification', 10) == 0   # the claim is stale now
    assert sorted(p.name for p in (out/'patches').iterdir()) == ['a.h5', 'b.h5']
