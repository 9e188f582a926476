"""Paper 3 on a CUDA device: meta-training of Conv-4 with the loop's AMP on (autocast + gradient scaler; `MetaStep`
computes the meta-gradient itself in fp32) for second-order MAML and the lazy teacher, the functional core under
autocast, the lazy method's flat memory in the inner horizon measured by the CUDA allocator, and a run folder re-scored
by `meta eval`. Skipped without a GPU (`pytest -m cuda` selects these on a machine that has one)."""
import json, math

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


def _cfg(method:str, **changes):
    from medssm.meta.train import base_config
    d = dict(hidden=16, meta_batch=4, max_epochs=2, steps_per_epoch=3, val_batches=1, eval_tasks=10, method=method,
             inner_steps=1 if method == 'maml' else 4, device='cuda', amp=True)
    return base_config('digits', quick=True, **{**d, **changes})


@pytest.mark.parametrize('method,changes', [('maml', {}), ('lazy_maml', {}), ('lazy_reptile', {}), ('lazy_maml', {'bn': 'support'}),
                                            ('lazy_maml', {'inner_opt': 'adam', 'leap': 'literal'}), ('anil', {}), ('metasgd', {}),
                                            ('imaml', {'cg_steps': 3})])
def test_meta_training_steps_under_amp(method, changes):
    "A Conv-4 meta-trained on the GPU under the loop's AMP: every method (ANIL, Meta-SGD, iMAML too), support BN, inner Adam."
    from medssm.meta.train import build_model, meta_train
    cfg = _cfg(method, **changes)
    start = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    r = meta_train(cfg)
    assert next(r.model.parameters()).is_cuda
    assert all(math.isfinite(h['train_loss']) and math.isfinite(h['val_loss']) for h in r.history), r.history
    moved = [k for k, v in r.model.state_dict().items() if not torch.equal(v.cpu(), start[k])]
    assert moved, 'the meta-update changed no weight'
    assert 0 <= r.test['mean'] <= 100 and r.test['n'] == 10


def test_sinusoid_amp_matches_fp32_closely():
    "The functional core itself runs under autocast (an MLP, no BatchNorm): fp16 matmuls change the query loss only a little."
    from medssm.meta.core import MetaConfig, meta_step
    from medssm.meta.data import SinusoidTasks
    from medssm.meta.train import SineMLP
    torch.manual_seed(0)
    net = SineMLP().cuda()
    batch = {k: v.cuda() for k, v in SinusoidTasks(k_shot=10).sample_batch(8, seed=0).items()}
    cfg = MetaConfig(method='fomaml', task='regression', inner_steps=5, inner_lr=0.01)   # no grid choice that fp16 could flip
    _, fp32 = meta_step(net, batch, cfg)
    with torch.autocast('cuda', dtype=torch.float16):
        _, amp = meta_step(net, batch, cfg)
    torch.testing.assert_close(amp['loss'].float(), fp32['loss'], rtol=5e-2, atol=5e-2)


def test_attack_step_on_cuda():
    "Du et al.'s attack loop with a black box and an attacker on the GPU: queries counted, the iterate a valid image."
    from medssm.meta.attack import AttackConfig, MetaAttacker, QueryCounter, attack_image
    torch.manual_seed(0)
    box = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).cuda()
    x = torch.rand(1, 8, 8, device='cuda'); y = int(box(x[None]).argmax())
    r = attack_image(QueryCounter(box), x, y, AttackConfig(max_iters=6, coords=4, finetune_every=3), MetaAttacker(1, 4).cuda())
    assert r.adversarial.is_cuda and 0 <= float(r.adversarial.min()) and float(r.adversarial.max()) <= 1
    assert r.queries <= 1 + 6 + 2 * 2 * 4


def test_lazy_memory_flat_in_k_on_cuda():
    "The paper's claim with the CUDA allocator's peak: lazy MAML flat in k, second-order MAML growing."
    from medssm.meta.train import bench_meta
    lazy = {r['k']: r['peak_mb'] for r in bench_meta(ks=(5, 50), methods=('lazy_maml',), image_size=28, hidden=32, device='cuda')}
    maml = {r['k']: r['peak_mb'] for r in bench_meta(ks=(2, 10), methods=('maml',), image_size=28, hidden=32, device='cuda')}
    assert lazy[50] <= 1.3 * lazy[5] + 1.0, lazy
    assert maml[10] > 1.5 * maml[2], maml


def test_run_on_cuda_rescored_by_eval(tmp_path, capsys):
    from medssm.cli import main
    rc = main(['meta', 'train', '--quick', '--hidden', '8', '--epochs', '1', '--steps-per-epoch', '2', '--eval-tasks', '10',
               '--device', 'cuda', '--out', str(tmp_path/'r'), '--json'])
    out = capsys.readouterr()
    assert rc == 0, out.err
    stored = json.loads((tmp_path/'r'/'test_metrics.json').read_text())
    rc = main(['meta', 'eval', '--run', str(tmp_path/'r'), '--json'])
    out = capsys.readouterr()
    assert rc == 0, out.err
    again = json.loads(out.out)
    assert again['task_seed'] == stored['task_seed'] and again['n'] == stored['n']
    assert again['mean'] == pytest.approx(stored['mean'], abs=1e-6)       # same device, same tasks, same weights
