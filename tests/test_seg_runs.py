"""Paper 2 run folders: what a `medssm seg train` folder promises. `eval` reproduces the stored test metrics exactly
whatever `--seed` it gets; crafted checkpoints never run code; a resume with another model, data or size is refused
without touching the folder; a second concurrent `train` is refused at once; bad values and bad files fail before a
folder exists. Commands run in this process through `medssm.cli.main` (a subprocess only for the concurrency test)."""
import contextlib, io, json, logging, os, shutil, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--quick', '--patients', '4', '--phantom-size', '48', '64', '--size', '32', '--width', '4',
        '--model', 'lighter_unet@4', '--name', 'r']


def cli(*args):
    "`medssm ...` in this process: (exit status, stdout, stderr, progress lines of the medssm logger)."
    from medssm.cli import main
    out, err, logs = io.StringIO(), io.StringIO(), io.StringIO()
    handler, log = logging.StreamHandler(logs), logging.getLogger('medssm')
    log.addHandler(handler); log.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main([str(a) for a in args])
    except SystemExit as e: rc = e.code                            # argparse's own errors (a bad choice) exit 2
    finally: log.removeHandler(handler)
    return rc, out.getvalue(), err.getvalue(), logs.getvalue()


def one_error_line(err):
    "Exactly one `error:` line (progress lines may precede it on stderr), and no traceback."
    lines = err.strip().splitlines()
    return [l for l in lines if l.startswith('error: ')] == lines[-1:] and lines and 'Traceback' not in err


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    "One finished 2-epoch run on tiny phantoms (copied by the tests that tamper with it)."
    import torch; torch.set_num_threads(1)
    out = tmp_path_factory.mktemp('seg_runs')
    rc, stdout, err, _ = cli('seg', 'train', *TINY, '--epochs', '2', '--out', out, '--json')
    assert rc == 0, err
    return out/'r', json.loads(stdout)


def copy_of(finished, tmp_path):
    run = tmp_path/'runs'/'r'
    shutil.copytree(finished[0], run)
    return run


def test_run_folder_holds_config_data_split_and_test_metrics(finished):
    run, summary = finished
    rec = json.loads((run/'run.json').read_text())
    assert rec['kind'] == 'seg' and rec['data']['source'] == 'phantoms' and rec['data']['n_patients'] == 4
    assert set(rec['split']) == {'train', 'val', 'test'} and all(rec['split'].values())
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['model'] == 'lighter_unet@4' and cfg['size'] == 32 and cfg['fit']['lr'] == 1e-4 and cfg['fit']['max_epochs'] == 2
    metrics = json.loads((run/'test_metrics.json').read_text())
    assert {k: metrics[k] for k in ('dice', 'hd95', 'n')} == {'dice': summary['test_dice'], 'hd95': summary['test_hd95'], 'n': len(rec['split']['test'])}
    assert {'dice_median', 'dice_ci_low', 'dice_ci_high', 'hd95_median', 'assd_mean', 'surface_dice_mean', 'n_empty_pred', 'n_empty_gt'} <= set(metrics)
    assert not (run/'.lock').exists()


@pytest.mark.parametrize('seed', ['0', '7'])
def test_eval_reproduces_test_metrics_exactly_whatever_seed(finished, seed):
    run, _ = finished
    rc, out, err, logs = cli('seg', 'eval', '--run', run, '--seed', seed, '--json', '--out', run.parent/f'eval_{seed}.csv')
    assert rc == 0, err
    ev = json.loads(out)
    stored = json.loads((run/'test_metrics.json').read_text())
    assert {k: ev[k] for k in stored} == stored and ev['reproduces_test_metrics'] is True and ev['path'] == 'fp32'
    assert 'its stored test split' in logs and 'phantoms' in logs


def _evil_checkpoint(path, marker):
    import torch
    class Evil:
        def __reduce__(self): return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))
    torch.save({'model': {}, 'x': Evil()}, path)


def test_crafted_best_checkpoint_does_not_run_on_eval(finished, tmp_path):
    run, marker = copy_of(finished, tmp_path), tmp_path/'pwned'
    _evil_checkpoint(run/'checkpoints'/'best.pt', marker)
    rc, out, err, _ = cli('seg', 'eval', '--run', run)
    assert rc == 2 and one_error_line(err) and 'refused' in err and 'best.pt' in err, err
    assert not marker.exists()


def test_crafted_last_checkpoint_does_not_run_on_resume(finished, tmp_path):
    run, marker = copy_of(finished, tmp_path), tmp_path/'pwned'
    _evil_checkpoint(run/'checkpoints'/'last.pt', marker)
    rc, out, err, _ = cli('seg', 'train', *TINY, '--epochs', '3', '--out', run.parent)     # a longer budget resumes
    assert rc == 2 and one_error_line(err) and 'refused' in err and 'last.pt' in err, err
    assert not marker.exists()


@pytest.mark.parametrize('change, named', [
    (['--model', 'lighter_unet@2'], 'model: "lighter_unet@4" → "lighter_unet@2"'),
    (['--patients', '5'], 'data fingerprint'),
    (['--size', '48'], 'size: 32 → 48'),
    (['--lr', '0.001'], 'fit.lr: 0.0001 → 0.001'),
])
def test_resume_with_another_model_data_or_size_is_refused(finished, tmp_path, change, named):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    rc, out, err, _ = cli('seg', 'train', *TINY, '--epochs', '2', *change, '--out', run.parent)
    assert rc == 2 and one_error_line(err) and named in err and 'nothing was changed' in err, err
    assert snapshot(run) == before


def test_same_command_on_a_finished_run_returns_its_results(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    rc, out, err, _ = cli('seg', 'train', *TINY, '--epochs', '2', '--out', run.parent, '--json')
    assert rc == 0, err
    again = json.loads(out)
    assert {k: again[k] for k in ('test_dice', 'test_hd95', 'epochs')} == {k: finished[1][k] for k in ('test_dice', 'test_hd95', 'epochs')}


def test_second_concurrent_train_is_refused_at_once(tmp_path):
    args = [*TINY, '--epochs', '400', '--out', str(tmp_path)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    first = subprocess.Popen([sys.executable, '-c', 'import sys; from medssm.cli import main; sys.exit(main(sys.argv[1:]))',
                              'seg', 'train', *args, '--quiet'], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        lock, t0 = tmp_path/'r'/'.lock', time.time()
        while not lock.exists():
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.time() - t0 < 120, 'the first training never locked its folder'
            time.sleep(0.2)
        t0 = time.time()
        rc, out, err, _ = cli('seg', 'train', *args)
        assert rc == 2 and one_error_line(err) and f'in use by process {first.pid}' in err, err
        assert time.time() - t0 < 30
    finally:
        first.kill(); first.wait()


@pytest.mark.parametrize('bad, named', [
    (['--size', '0'], '--size 0'),
    (['--size', '8'], '--size 8: lighter_unet@4 cannot take 8×8'),
    (['--model', 'fcn8s', '--size', '40'], '--size 40: fcn8s cannot take 40×40'),
    (['--width', '0'], '--width 0'),
    (['--model', 'unet_xl'], '--model unet_xl'),
    (['--model', 'unet@128'], "'unet' has no '@' variant"),
    (['--backbone-weights', 'x.pth'], '--backbone-weights: lighter_unet@4 has no pretrained backbone'),
    (['--surface-tolerance', '-1'], '--surface-tolerance -1.0'),
    (['--precise-bn', '-1'], '--precise-bn -1'),
    (['--model', 'lighter_unet@3'], 'group size 3 does not divide 4'),
    (['--patients', '2'], '--patients 2'),
    (['--lr', '0'], '--lr 0.0'),
    (['--loss', 'focal'], 'invalid choice'),
])
def test_bad_values_exit_2_with_one_line(tmp_path, bad, named):
    rc, out, err, _ = cli('seg', 'train', *TINY, *bad, '--out', tmp_path)
    assert rc == 2 and named in err, err
    assert one_error_line(err) or 'usage:' in err                 # argparse's own errors come with the usage line
    assert not any(tmp_path.iterdir())


def test_truncated_test_image_fails_before_training_and_leaves_no_folder(tmp_path):
    from medssm.seg.data import write_phantom_folder, load_cases, split_names
    root = write_phantom_folder(tmp_path/'data', 4, seed=0, layout='folder', size=(48, 64))
    test_name = split_names(load_cases(str(root)), seed=0)['test'][0]
    img = root/'images'/f'{test_name}.png'
    img.write_bytes(img.read_bytes()[:200])
    t0 = time.time()
    rc, out, err, _ = cli('seg', 'train', '--data', root, '--size', '32', '--width', '4', '--model', 'lighter_unet@4',
                          '--epochs', '50', '--out', tmp_path/'runs')
    assert rc == 2 and one_error_line(err) and f'{test_name}.png' in err and 'test image/mask pairs' in err, err
    assert time.time() - t0 < 30 and not (tmp_path/'runs').exists()
