"""Paper 2 with only the core install: the `[seg]` extra (onnx, onnxruntime, onnxscript) is optional. Importing
`medssm.seg.all`, `seg train`, `seg eval` and `bench seg` work without it (the ONNX path is left out of what the
parity gate and the benchmark consider); asking for ONNX raises `MissingDependency` naming `pip install "medssm[seg]"`.
The ONNX modules are blocked in a fresh interpreter (`sys.modules[name] = None`), so this runs on a full install too."""
import json, os, subprocess, sys, textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = textwrap.dedent(r'''
    import sys, json
    for m in ('onnx', 'onnxruntime', 'onnxscript'): sys.modules[m] = None      # as if the [seg] extra were absent
    import medssm.seg.all
    import torch; torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    from test_seg_runs import cli, one_error_line, TINY
    from medssm.core import MissingDependency
    from medssm.seg.deploy import Predictor, export_onnx, available_paths, candidate_paths, PATHS
    from medssm.seg.models import create_model
    res = dict(available=list(available_paths()), candidates=list(candidate_paths()))
    model = create_model('lighter_unet@4', width=4).eval()
    for name, fn in [('predictor', lambda: Predictor(model, 'onnx', size=32)),
                     ('export', lambda: export_onnx(model, sys.argv[1] + '/m.onnx', size=32))]:
        try: fn(); res[name] = 'no error'
        except MissingDependency as e: res[name] = str(e)
    out = sys.argv[1]
    rc, stdout, err, _ = cli('seg', 'train', *TINY, '--epochs', '1', '--out', out, '--json')
    res['train'] = (rc, err)
    rc, stdout, err, _ = cli('seg', 'eval', '--run', out + '/r', '--path', 'auto', '--json')
    res['eval_auto'] = (rc, json.loads(stdout)['path'] if rc == 0 else err)
    rc, stdout, err, _ = cli('seg', 'export', '--run', out + '/r')
    res['export_cmd'] = (rc, err, one_error_line(err))
    rc, stdout, err, _ = cli('bench', 'seg', '--models', 'lighter_unet@4', '--size', '32', '--width', '4', '--repeats', '1', '--no-isolate', '--json')
    res['bench'] = (rc, sorted(k for k in json.loads(stdout)[0] if k.startswith('ms_')) if rc == 0 else err)
    rc, stdout, err, _ = cli('bench', 'seg', '--models', 'lighter_unet@4', '--size', '32', '--width', '4', '--paths', 'onnx', '--no-isolate')
    res['bench_onnx'] = (rc, err)
    print(json.dumps(res))
''')


def test_core_install_runs_seg_and_onnx_names_the_extra(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', MEDSSM_QUICK='1')
    r = subprocess.run([sys.executable, '-c', CODE, str(tmp_path), str(ROOT/'tests')], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert 'onnx' not in res['available'] and 'fp32' in res['available'] and 'onnx' not in res['candidates']
    for name in ('predictor', 'export'):
        assert 'medssm[seg]' in res[name] and 'ONNX' in res[name], res[name]
    assert res['train'][0] == 0, res['train'][1]
    assert res['eval_auto'] == [0, res['eval_auto'][1]] and res['eval_auto'][1] != 'onnx', res['eval_auto']
    rc, err, one = res['export_cmd']
    assert rc == 2 and one and 'medssm[seg]' in err, err
    assert res['bench'][0] == 0 and 'ms_onnx' not in res['bench'][1] and 'ms_fp32' in res['bench'][1], res['bench']
    assert res['bench_onnx'][0] == 2 and 'medssm[seg]' in res['bench_onnx'][1], res['bench_onnx']
