"""The shared loop on a CUDA device: AMP training steps, and a resumed run that equals an uninterrupted one.
Skipped without a GPU (`pytest -m cuda` selects these on a machine that has one)."""
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


def _data():
    from medssm.data import load_digits_arrays, ArrayDataset, stratified_split
    X, Y = load_digits_arrays(); X = X.reshape(len(X), -1)
    tr, va = stratified_split(Y, (0.8, 0.2), seed=0)
    return ArrayDataset(X[tr], Y[tr]), ArrayDataset(X[va], Y[va])


def _mlp():
    from medssm.core import seed_everything
    seed_everything(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_fit_amp_on_cuda_learns():
    from medssm.train import FitConfig, fit
    from medssm.metrics import accuracy
    tr, va = _data()
    res = fit(_mlp(), tr, va, config=FitConfig(max_epochs=3, batch_size=64, lr=3e-3, amp=True, device='cuda', progress=False),
              metrics={'acc': accuracy})
    assert next(res.model.parameters()).is_cuda
    assert res.history[-1]['val_acc'] > 0.8


def test_resume_on_cuda_matches_uninterrupted(tmp_path):
    from medssm.train import FitConfig, fit
    tr, va = _data()
    cfg = FitConfig(batch_size=64, lr=3e-3, amp=True, device='cuda', progress=False, lookahead_k=3)
    full = fit(_mlp(), tr, va, config=cfg.replace(max_epochs=4), run=tmp_path/'full')
    fit(_mlp(), tr, va, config=cfg.replace(max_epochs=2), run=tmp_path/'cut').run.release()
    resumed = fit(_mlp(), tr, va, config=cfg.replace(max_epochs=4), run=tmp_path/'cut')
    strip = lambda h: [{k: v for k, v in r.items() if k != 'seconds'} for r in h]
    assert strip(resumed.history) == strip(full.history)
