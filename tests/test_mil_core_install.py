"""Paper 1 with the core install only: OpenSlide, scikit-image, shapely, timm and imagecodecs come with the `[wsi]`
extra, so `import medssm.mil.all`, `medssm mil train` and `medssm mil eval` on feature files must work without them, and what reads a
slide (or needs the others) must say which extra to install instead of failing with an ImportError at import."""
import json, os, subprocess, sys, textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WSI_EXTRA = ('openslide', 'skimage', 'shapely', 'timm', 'imagecodecs')

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    for m in {blocked!r}: sys.modules[m] = None          # as if the [wsi] extra were not installed
    import numpy as np, torch
    torch.set_num_threads(1)
    import medssm.mil.all as mil
    import medssm.mil.cli                                  # registers `medssm mil …`
    from medssm.cli import main
    from medssm.core import MissingDependency
    out = Path(sys.argv[1]); feats = out/'features'; feats.mkdir(parents=True)
    rng, rows = np.random.default_rng(0), ['slide_id,label']
    for i in range(12):
        y = i % 2
        x = rng.normal(size=(16, 8)).astype(np.float32); x[:3, 0] += 3 * y          # a few witnesses in positive bags
        c = np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(-1, 2) * 256
        mil.save_h5(feats/f's{{i}}.h5', c, x, dict(patch_size=256, patch_level=0))
        rows.append(f's{{i}},{{"tumor" if y else "normal"}}')
    (out/'slides.csv').write_text('\\n'.join(rows) + '\\n')
    rc = main(['mil', 'train', '--slides', str(out/'slides.csv'), '--features', str(feats), '--out', str(out/'run'),
               '--in-dim', '8', '--d-state', '4', '--max-epochs', '1', '--threads', '1', '--quiet'])
    eval_rc = main(['mil', 'eval', '--run', str(out/'run'), '--threads', '1', '--quiet'])
    errors = {{}}
    for name, call in [('open_slide', lambda: mil.open_slide(feats/'s0.h5')),
                       ('tissue_mask', lambda: mil.tissue_mask(np.zeros((8, 8, 3), np.uint8))),
                       ('make_demo_slide', lambda: mil.make_demo_slide(out/'demo.tiff')),
                       ('annotation_fractions', lambda: mil.annotation_fractions(None, np.zeros((1, 2)), 256)),
                       ('timm extractor', lambda: mil.create_extractor('timm:resnet18', random_weights=True))]:
        try: call(); errors[name] = None
        except MissingDependency as e: errors[name] = str(e)
    print(json.dumps(dict(train_rc=rc, eval_rc=eval_rc, errors=errors, imported=[m for m in {blocked!r} if sys.modules.get(m) is not None])))
''')


def test_core_install_trains_on_features_and_names_the_wsi_extra(tmp_path):
    script = SCRIPT.format(blocked=WSI_EXTRA)
    r = subprocess.run([sys.executable, '-c', script, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['train_rc'] == 0 and res['eval_rc'] == 0, r.stderr[-4000:]
    assert (tmp_path/'run'/'test_metrics.json').exists()
    assert res['imported'] == []
    for name, msg in res['errors'].items():
        assert msg is not None, f'{name} did not raise MissingDependency'
        assert 'pip install "medssm[wsi]"' in msg, (name, msg)
    assert 'reading slides' in res['errors']['open_slide']
