"""Paper 1 on a CUDA device: a training step of SSM-MIL under AMP, and the S4D convolution methods agreeing on the GPU.
Skipped without CUDA (select with `-m cuda`)."""
import math

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]

from medssm.mil.data import DigitBags
from medssm.mil.ssm import S4D, s4d_discretize, ssm_conv
from medssm.mil.train import MILConfig, predict_mil, train_mil


def test_ssm_mil_trains_a_step_under_amp():
    "One epoch of SSM-MIL (8 bags = 8 optimizer steps) on CUDA with float16 autocast: finite loss, weights moved."
    bags = DigitBags(n_bags=8, min_len=300, max_len=600, in_dim=64, witness_rate=0.05, seed=0)
    cfg = MILConfig(in_dim=64, d_state=16).replace(device='cuda', amp=True, max_epochs=1, lr=1e-3, progress=False)
    from medssm.mil.train import build_mil_model
    model = build_mil_model(cfg)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = train_mil(cfg, bags, model=model)
    assert next(res.model.parameters()).device.type == 'cuda'
    assert math.isfinite(res.history[0]['train_loss'])
    after = res.model.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    probs, _ = predict_mil(res.model, bags, cfg)                          # float32 evaluation on the device
    assert probs.shape == (8, 2) and np.isfinite(probs).all()


@pytest.mark.parametrize('L', [100, 4097])
def test_chunked_and_fft_kernels_agree_on_cuda(L):
    "The chunked state-passing and the blockwise-kernel FFT convolutions give the same outputs and gradients on CUDA."
    torch.manual_seed(0)
    dev, H, n = torch.device('cuda'), 16, 8
    log_dt = torch.empty(H, device=dev).uniform_(math.log(1e-3), math.log(1e-1)).requires_grad_()
    log_A_real = torch.full((H, n), math.log(0.5), device=dev, requires_grad=True)
    A_imag = (math.pi * torch.arange(n, device=dev, dtype=torch.float32).repeat(H, 1)).requires_grad_()
    C = torch.randn(H, n, 2, device=dev, requires_grad=True)
    u = torch.randn(2, H, L, device=dev, requires_grad=True)
    outs = {}
    for method in ('chunked', 'fft'):
        params = (log_dt, log_A_real, A_imag, C, u)
        for p in params: p.grad = None
        y = ssm_conv(u, *s4d_discretize(log_dt, log_A_real, A_imag, C), method=method)   # (B, H, L)
        (y * torch.linspace(-1, 1, y.numel(), device=dev).reshape(y.shape)).sum().backward()
        outs[method] = [y.detach()] + [p.grad.clone() for p in params]
    for a, b in zip(outs['chunked'], outs['fft']):
        assert ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() < 1e-3


def test_s4d_layer_methods_agree_under_autocast():
    "The layer runs its SSM in float32 under autocast, so both methods agree to half precision on a (B, L, H) input."
    torch.manual_seed(0)
    layer = S4D(32, d_state=16, transposed=False).cuda().eval()
    x = torch.randn(1, 3000, 32, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
        layer.method = 'chunked'; a = layer(x).float()
        layer.method = 'fft'; b = layer(x).float()
    assert torch.isfinite(a).all() and ((a - b).abs().max() / b.abs().max()).item() < 1e-2


def test_multitask_step_and_patch_scores_on_cuda():
    "Eq. 7 on CUDA under AMP with unlabelled patches (−100) in the batch, and patch scores in file order equal the CPU's."
    from medssm.mil.data import Bag
    from medssm.mil.heatmaps import bag_patch_scores, patch_scores
    from medssm.mil.train import build_mil_model
    bags = DigitBags(n_bags=8, min_len=200, max_len=400, in_dim=64, witness_rate=0.05, seed=1)
    bags.patch_labels = [pl if i % 2 else np.full(len(pl), -100) for i, pl in enumerate(bags.patch_labels)]
    cfg = MILConfig(in_dim=64, d_state=16, multitask=True).replace(device='cuda', amp=True, max_epochs=1, lr=1e-3, progress=False)
    res = train_mil(cfg, bags, model=build_mil_model(cfg))
    assert math.isfinite(res.history[0]['train_loss'])
    x = bags.features(0)
    order = np.random.default_rng(0).permutation(len(x))
    bag = Bag(x, None, order)                                   # a bag whose file rows are permuted
    gpu = bag_patch_scores(res.model.cuda(), bag)
    cpu = bag_patch_scores(res.model.cpu(), bag)
    assert np.allclose(gpu, cpu, atol=1e-4)
    assert np.allclose(gpu[order], patch_scores(res.model, x), atol=1e-4)   # file row order[i] holds reading position i
