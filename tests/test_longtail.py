"""Long-tailed recognition (paper 3, Algorithm 2): the ε update against a direct computation of its definition,
the class-balanced weights and the long-tail cut, and the `medssm meta longtail` pipeline end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medssm.core import InputError
from medssm.meta.longtail import (LT_METHODS, LongTailStep, class_balanced_weights, eps_gradient, l2rw_weights, longtail_counts,
                             longtail_seeds, paired_comparison, quick_longtail_config, split_state, virtual_step, val_loss_acc)



def _tiny(seed=0):
    "A tiny two-layer net with a BatchNorm in float64 and a batch / balanced validation batch."
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 0, 0, 1, 0])
    xv, yv = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.tensor([0.3, 1.2, 2.5, 0.3, 0.3, 0.3, 1.2, 0.3], dtype=torch.float64)
    return net, x, y, w, xv, yv


def _val_after_virtual_step(net, x, y, w, eps, xv, yv, eta, gamma=1.0, phi=None):
    "L_val(γ θ̃(ε) + (1 − γ) φ) computed the plain way: a deep copy of the network updated by hand."
    import copy
    m = copy.deepcopy(net); m.train()
    params = list(m.parameters())
    loss = ((w + eps) * F.cross_entropy(m(x), y, reduction='none')).mean()        # Alg. 2, line 5
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads)):
            t = p - eta * g                                                        # line 6
            p.copy_(t if phi is None else gamma * t + (1 - gamma) * phi[i])        # line 12's leap
    with torch.no_grad(): return float(F.cross_entropy(m(xv), yv))


def test_eps_update_matches_finite_differences_of_its_definition():
    net, x, y, w, xv, yv = _tiny()
    eta, h = 0.5, 1e-6
    got = eps_gradient(net, x, y, w, xv, yv, eta).grad
    fd = []
    for i in range(len(y)):
        e = torch.zeros(len(y), dtype=torch.float64); e[i] = h
        fd.append((_val_after_virtual_step(net, x, y, w, e, xv, yv, eta) -
                   _val_after_virtual_step(net, x, y, w, -e, xv, yv, eta)) / (2 * h))
    torch.testing.assert_close(got, torch.tensor(fd, dtype=torch.float64), atol=1e-7, rtol=1e-5)
    # the update of Alg. 2, line 12 from ε = 0 is −τ ∇ε, and the step uses w_y + ε
    step = LongTailStep('two_component', torch.tensor([0.3, 1.2, 2.5], dtype=torch.float64), (xv, yv), eta=eta, tau=2.0)
    torch.testing.assert_close(step.weights(net, x, y), w - 2.0 * got)


@pytest.mark.parametrize('leap_param', ['rate', 'literal'])
def test_lazy_eps_update_matches_finite_differences_through_the_leap(leap_param):
    "Both readings of the leap: rate (1−γ)θ̃ + γφ_k (default) and γθ̃ + (1−γ)φ_k as printed."
    net, x, y, w, xv, yv = _tiny(1)
    eta, k, h = 0.3, 3, 1e-6
    res = eps_gradient(net, x, y, w, xv, yv, eta, k=k, gammas=torch.tensor([0.8, 0.9], dtype=torch.float64), leap_param=leap_param)
    w_teacher = 1 - res.gamma if leap_param == 'rate' else res.gamma   # the weight of θ̃(ε) in the leap
    assert res.gamma in (0.8, 0.9)
    theta, buffers = split_state(net)
    phi = virtual_step(net, theta, buffers, x, y, w, eta)                     # the student starts at θ̃(0) ...
    for _ in range(k): phi = virtual_step(net, phi, buffers, x, y, w, eta)    # ... and takes k steps
    phi = [phi[n].detach() for n, _ in net.named_parameters()]                # a constant for the teacher
    fd = []
    for i in range(len(y)):
        e = torch.zeros(len(y), dtype=torch.float64); e[i] = h
        fd.append((_val_after_virtual_step(net, x, y, w, e, xv, yv, eta, w_teacher, phi) -
                   _val_after_virtual_step(net, x, y, w, -e, xv, yv, eta, w_teacher, phi)) / (2 * h))
    torch.testing.assert_close(res.grad, torch.tensor(fd, dtype=torch.float64), atol=1e-7, rtol=1e-5)
    # the chosen γ is the most accurate leap on the validation batch
    accs = []
    for g in (0.8, 0.9):
        wt = 1 - g if leap_param == 'rate' else g
        p = {n: wt * t + (1 - wt) * f for (n, t), f in zip(virtual_step(net, theta, buffers, x, y, w, eta).items(), phi)}
        accs.append(float(val_loss_acc(net, p, buffers, xv, yv)[1]))
    assert accs[(0.8, 0.9).index(res.gamma)] == max(accs)


def test_l2rw_weights_and_class_weights():
    torch.testing.assert_close(l2rw_weights(torch.tensor([-1., 2., -3.])), torch.tensor([0.25, 0., 0.75]))
    w = class_balanced_weights([500, 50, 5])
    assert abs(float(w.sum()) - 3) < 1e-5 and w[2] > w[1] > w[0]
    with pytest.raises(InputError, match='zero training examples'):
        longtail_counts(50, 100, 200)


def _cli(capsys, *args):
    "Run `medssm ARGS` in this process (the console script itself is tested with the engine); (rc, stdout, stderr)."
    from medssm.cli import main
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_longtail_end_to_end(tmp_path, capsys):
    torch.set_num_threads(1)
    rc, out, err = _cli(capsys, 'meta', 'longtail', '--quick', '--epochs', '2', '--t1', '1', '--imbalance', '20',
                        '--out', str(tmp_path), '--json')
    assert rc == 0, err
    rows = json.loads(out.splitlines()[0])
    assert [row['method'] for row in rows] == list(LT_METHODS)
    assert all(0 <= row['IF 20'] <= 100 for row in rows)
    assert min(row['IF 20'] for row in rows) < 60            # far better than chance (90 %) on 10-class digits
    assert (tmp_path/'table4.csv').exists() and (tmp_path/'if20'/'stage1'/'metrics.jsonl').exists()


def test_cli_longtail_errors(tmp_path, capsys):
    rc, _, err = _cli(capsys, 'meta', 'longtail', '--quick', '--imbalance', '1000', '--out', str(tmp_path))
    assert rc == 2 and 'zero training examples' in err and 'Traceback' not in err
    rc, _, err = _cli(capsys, 'meta', 'longtail', '--dataset', 'cifar100', '--root', str(tmp_path/'nowhere'), '--quick',
                      '--out', str(tmp_path))
    assert rc == 2 and 'file not found' in err


def test_resumed_run_matches_uninterrupted(tmp_path):
    "A weighting stage stopped after one epoch and resumed from its run folder gives the same history and test error."
    from medssm.meta.longtail import load_longtail, quick_longtail_config, stage1_config, train_longtail, train_stage
    torch.set_num_threads(1)
    c = quick_longtail_config(max_epochs=4, t1=2, milestones=[2], method='lazy_two_component')
    data = load_longtail(c)
    start = train_stage(stage1_config(c), data)['model'].state_dict()
    ref = train_longtail(c, data, start, out=tmp_path/'ref')
    train_longtail(c.replace(max_epochs=3), data, start, out=tmp_path/'resumed')   # "interrupted" after one weighting epoch
    res = train_longtail(c, data, start, out=tmp_path/'resumed')
    strip = lambda h: [{k: v for k, v in r.items() if k != 'seconds'} for r in h]
    assert len(res['history']) == 2 and strip(res['history']) == strip(ref['history'])
    assert res['test_error'] == ref['test_error']


def test_cli_longtail_run_folders_eval_and_refusals(tmp_path, capsys):
    "Each method's run folder (kind 'longtail'): `meta eval` reproduces its test error; another model is refused untouched."
    torch.set_num_threads(1)
    args = ['meta', 'longtail', '--quick', '--epochs', '2', '--t1', '1', '--imbalance', '20', '--methods', 'cb_ce',
            '--out', str(tmp_path)]
    rc, _, err = _cli(capsys, *args)
    assert rc == 0, err
    run = tmp_path/'if20'/'cb_ce'
    stored = json.loads((run/'test_metrics.json').read_text())
    rc, out, err = _cli(capsys, 'meta', 'eval', '--run', str(run), '--seed', '3', '--json')
    assert rc == 0, err
    assert json.loads(out) == {'run': str(run), **stored}
    record = json.loads((run/'run.json').read_text())
    assert record['kind'] == 'longtail' and len(record['split']['val']) == 100 and record['data']['dataset'] == 'digits'
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob('*')) if p.is_file()}
    rc, _, err = _cli(capsys, *args, '--model', 'resnet20')
    assert rc == 2 and 'model: "resnet8" → "resnet20"' in err and err.count('error:') == 1, err
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob('*')) if p.is_file()} == before


def test_bad_longtail_values(tmp_path, capsys):
    for flags, msg in ((['--t1', '9'], '--t1 9'), (['--inner-steps', '0'], '--inner-steps 0'), (['--n-val', '0'], '--n-val 0'),
                       (['--model', 'resnet33'], '--model resnet33')):
        rc, _, err = _cli(capsys, 'meta', 'longtail', '--quick', *flags, '--out', str(tmp_path/'x'))
        assert rc == 2 and msg in err and 'Traceback' not in err, (flags, err)
    assert not (tmp_path/'x').exists()


def test_eps_scale_makes_eps_move_and_seeds_are_paired(tmp_path):
    "With --eps-scale the per-example weights move (RMS ε = eps_scale × mean w_y); methods of one seed share their batches."
    torch.set_num_threads(1)
    net, x, y, w, xv, yv = _tiny(2)
    cw = torch.tensor([0.3, 1.2, 2.5], dtype=torch.float64)
    raw = LongTailStep('two_component', cw, (xv, yv), eta=0.1, tau=1.0)
    scaled = LongTailStep('two_component', cw, (xv, yv), eta=0.1, tau=1.0, eps_scale=0.4)
    w_raw, w_scaled = raw.weights(net, x, y), scaled.weights(net, x, y)
    eps = w_scaled - cw[y]
    assert (w_scaled >= 0).all()
    assert abs(scaled.stats['eps_rel'][0] - 0.4) < 1e-6 and scaled.stats['eps_std'][0] > 0
    # the direction of ε is the raw gradient's: the scaled ε is a positive multiple of the raw one (before clipping)
    raw_eps = w_raw - cw[y]
    ratio = eps[(cw[y] + eps) > 0] / raw_eps[(cw[y] + eps) > 0]
    assert (ratio > 0).all() and float(ratio.max() - ratio.min()) < 1e-6 * float(ratio.abs().max())
    c = quick_longtail_config(max_epochs=2, t1=1, eps_scale=0.5)
    long = longtail_seeds(c, 20, ('cb_ce', 'two_component', 'lazy_two_component'), seeds=(0, 1), out=tmp_path)
    assert sorted(long.seed.unique()) == [0, 1] and len(long) == 6
    assert (long[long.method == 'lazy_two_component'].eps_rel.round(3) == 0.5).all()
    cmp = paired_comparison(long, 'lazy_two_component', 'cb_ce')
    assert cmp['seeds'] == [0, 1] and len(cmp['diffs']) == 2 and cmp['n'] == 2
    # every method's second stage sees the same batches: with β = 0 the class weights are all 1, so class-balanced
    # cross-entropy is cross-entropy, and the two runs coincide step for step
    from medssm.meta.longtail import load_longtail, stage1_config, train_longtail, train_stage
    c0 = quick_longtail_config(max_epochs=3, t1=2, beta=0.0)
    data = load_longtail(c0)
    start = train_stage(stage1_config(c0), data)['model'].state_dict()
    a_, b_ = (train_longtail(c0.replace(method=m), data, start) for m in ('ce', 'cb_ce'))
    assert a_['test_error'] == b_['test_error'] and a_['history'][-1]['train_loss'] == b_['history'][-1]['train_loss']
