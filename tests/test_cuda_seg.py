"""Paper 2 on CUDA: one training step of the paper's main model (Lighter U-Net@128, paper width, 256²) under AMP,
through the shared loop and by hand; an AMP run folder (the recipe's default on CUDA, with loader workers) whose fp32
evaluation reproduces its stored test metrics; the parity gate keeps fp32 on CUDA (no faster path is offered there).
Skipped where torch sees no CUDA device."""
import math
import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


def test_one_amp_step_by_hand():
    from medssm.seg.models import create_model
    from medssm.seg.train import dice_loss
    torch.manual_seed(0)
    model = create_model('lighter_unet@128').cuda().train()                     # paper width 64: 7,944,661 params
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
    scaler = torch.amp.GradScaler('cuda')
    x = torch.rand(2, 3, 256, 256, device='cuda')                                # (B, 3, S, S)
    y = (torch.rand(2, 1, 256, 256, device='cuda') > 0.7).float()                # (B, 1, S, S)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast('cuda', dtype=torch.float16):
        logits = model(x)                                                       # (B, 1, S, S)
        assert logits.dtype == torch.float16                                    # convs ran in half precision
        loss = dice_loss(logits, y)
    assert math.isfinite(loss.item())
    scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))   # the step changed the weights


def test_one_amp_epoch_through_fit(tmp_path):
    from medssm.seg.data import load_cases, split_names
    from medssm.seg.train import SegConfig, train_seg_run
    from medssm.seg.deploy import evaluate_seg_run
    from medssm.seg.train import loop_config
    cfg = SegConfig(model='lighter_unet@128').replace(device='cuda', max_epochs=1, steps_per_epoch=1,
                                                      batch_size=2, early_stop_min_epochs=0)
    assert cfg.fit.amp is True and loop_config(cfg).num_workers >= 1                 # AMP and loader workers on CUDA
    cases = load_cases('phantoms', patients=4, seed=0, size=(96, 128))
    summary = train_seg_run(cfg, cases, split_names(cases, seed=0), tmp_path/'run')
    assert summary['epochs'] == 1 and summary['params'] == 7_944_661 and 0 <= summary['test_dice'] <= 1
    ev, _ = evaluate_seg_run(tmp_path/'run')                                         # same device (the run's), fp32 eval
    assert ev['reproduces_test_metrics'] is True and ev['path'] == 'fp32'
    auto, _ = evaluate_seg_run(tmp_path/'run', path='auto')                          # CUDA: the gate has nothing faster to offer
    assert auto['path'] == 'fp32' and auto['parity']['parity'] == {}
