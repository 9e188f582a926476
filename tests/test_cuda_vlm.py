"""Paper 4 on CUDA: one pre-training step of the paper's model (ResNet-50 + text encoder, method 'ours') under AMP."""
import math

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


def test_pretrain_step_under_amp():
    from medssm.core import derive_seed, seed_everything
    from medssm.vlm.all import VLM, PretrainConfig, pretrain, split_datasets, split_pairs, synth_pairs
    cfg = PretrainConfig().replace(max_epochs=1, steps_per_epoch=1, batch_size=8, device='cuda', amp=True, progress=False)
    assert cfg.model.image_arch == 'resnet50' and cfg.method == 'ours' and cfg.image_size == 224
    pairs = synth_pairs(40, cfg.image_size, seed=0)
    ds = split_datasets(pairs, split_pairs(pairs, 0), cfg)
    seed_everything(derive_seed(cfg.fit.seed, 'model')); init = VLM(cfg.model)      # the weights `pretrain` starts from
    res = pretrain(cfg, ds['train'], ds['val'])
    h = res.history[0]
    assert math.isfinite(h['train_loss']) and 0 <= h['val_pert_acc'] <= 1
    assert next(res.model.parameters()).device.type == 'cuda'
    after = res.model.image.global_proj.weight.detach().float().cpu()
    assert not torch.equal(after, init.image.global_proj.weight.detach()), 'one SGD step under AMP changed nothing'
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
