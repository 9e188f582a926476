"""Paper 4 on CUDA: one pre-training step of the paper's model (ResNet-50 at 224² resized to 299², text encoder, method
'ours' with all three losses, learnable temperature, cosine schedule) under AMP."""
import math

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


def test_pretrain_step_under_amp():
    from medssm.core import derive_seed, seed_everything
    from medssm.vlm.all import VLM, PretrainConfig, pretrain, split_datasets, split_pairs, synth_pairs, zero_shot_eval
    cfg = PretrainConfig(learn_tau=True, schedule='cosine', warmup_steps=1).replace(
        max_epochs=1, steps_per_epoch=1, batch_size=8, device='cuda', amp=True, progress=False)
    assert cfg.model.image_arch == 'resnet50' and cfg.method == 'ours' and cfg.image_size == 224 and cfg.model.upsample_to == 299
    pairs = synth_pairs(40, cfg.image_size, seed=0)
    ds = split_datasets(pairs, split_pairs(pairs, 0), cfg)
    seed_everything(derive_seed(cfg.fit.seed, 'model')); init = VLM(cfg.model, tau=cfg.tau, learn_tau=True)   # the weights `pretrain` starts from
    res = pretrain(cfg, ds['train'], ds['val'])
    h = res.history[0]
    assert math.isfinite(h['train_loss']) and 0 <= h['val_pert_acc'] <= 1
    m = res.model
    assert next(m.parameters()).device.type == 'cuda'
    after = m.image.global_proj.weight.detach().float().cpu()
    assert not torch.equal(after, init.image.global_proj.weight.detach()), 'one SGD step under AMP changed nothing'
    assert not torch.equal(m.image.local_proj.weight.detach().cpu(), init.image.local_proj.weight.detach()), 'local loss gave no gradient'
    assert m.logit_scale.item() != init.logit_scale.item()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    with torch.no_grad(): g, loc = m.image(torch.randn(1, 1, 224, 224, device='cuda'))
    assert loc.shape[-2:] == (19, 19)
    ev = zero_shot_eval(m, ds['test'], device='cuda')       # fp32 evaluation on the GPU
    assert 0 <= ev['accuracy'] <= 1 and 'zs_auroc' in ev
