"""Paper 3 (issue 15): the protocol around the meta-gradients — both parametrisations of the leap against their
formulas, the evaluation horizon following training, which labelled examples each method reads, `bn='support'`
as the exact gradient of its stated objective, the inner optimisers (momentum, Adam, Meta-SGD, ANIL) and iMAML's
implicit gradient, the γ warning at the grid's edge, and one thread by default."""
import logging, math, os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from medssm.core import ConfigError
from medssm.meta.core import (MetaConfig, inner_loop, leap_grid, leap_weights, split_state, student, student_rollout,
                              task_meta_grad, task_views, teacher_search, gamma_summary, warn_gamma_edge)
from medssm.meta.inner import MetaSGD, conjugate_gradient, hvp, inner_state, inner_update


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tiny(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(2, 5)] + ([nn.BatchNorm1d(5, track_running_stats=False)] if bn else []) + [nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).double()


def _task(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x(6), torch.tensor([0, 1, 2] * 2), x(3), torch.tensor([0, 1, 2]), x(9), torch.tensor([0, 1, 2] * 3)


@pytest.mark.parametrize('leap', ['rate', 'literal'])
def test_leap_parametrisations_against_their_formulas(leap):
    "rate: (1−γ)θ + γφ̂ and meta-gradient (1−γ)∇L; literal (Eq. 4 as printed): γθ + (1−γ)φ̂ and γ∇L."
    cfg = MetaConfig(method='lazy_maml', inner_steps=6, inner_lr=0.5, checkpoints=2, leap=leap, val_source='paper')
    w, g = leap_grid(cfg)
    assert torch.allclose(cfg.gammas().repeat_interleave(len(w) // len(cfg.gammas())), g)
    keep = 1 - g if leap == 'rate' else g
    assert torch.allclose(w[:, 0], keep) and torch.allclose(w[:, 1:].sum(1), 1 - keep)
    assert torch.allclose(leap_weights(torch.tensor([0.8]), torch.tensor([[1.0]]), leap)[0],
                          torch.tensor([0.2, 0.8] if leap == 'rate' else [0.8, 0.2]))
    m = _tiny(); th, bf = split_state(m)
    xtr, ytr, xv, yv, xq, yq = _task()
    g_lazy, info = task_meta_grad(m, th, bf, xtr, ytr, xv, yv, xq, yq, cfg)
    ck, _ = student_rollout(m, th, bf, xtr, ytr, 6, 0.5, keep=2)
    ch = teacher_search(m, th, bf, ck, xtr, xv, yv, cfg)
    gamma = float(ch.gamma)
    w_theta = 1 - gamma if leap == 'rate' else gamma
    assert math.isclose(float(ch.weights[0]), w_theta, abs_tol=1e-7) and float(info['gamma']) == gamma
    rest = {k: sum(ch.weights[j + 1] * ck[j][k] for j in range(2)) for k in th}          # the checkpoints' part, constant
    ts = [th[k].clone().requires_grad_() for k in th]
    lq = F.cross_entropy(functional_call(m, {k: w_theta * t + rest[k] for k, t in zip(th, ts)}, (xq,)), yq)
    for k, r in zip(th, torch.autograd.grad(lq, ts)): torch.testing.assert_close(g_lazy[k], r, atol=1e-10, rtol=0)


def test_evaluation_horizon_follows_training():
    from medssm.meta.train import adapt_batch, base_config, experiment_configs, task_sampler, meta_train
    assert MetaConfig(inner_steps=7).k_eval == 7 and MetaConfig(inner_steps=7, eval_steps=3).k_eval == 3
    lazy = base_config('digits', method='lazy_maml', inner_steps=15)
    assert (lazy.meta.inner_steps, lazy.meta.k_eval) == (15, 15)                 # no eval_steps=10 override any more
    maml = base_config('miniimagenet', root='x', method='maml')
    assert (maml.meta.inner_steps, maml.meta.k_eval, maml.meta.inner_lr) == (5, 10, 0.01)   # MAML's published protocol
    sweep = dict(experiment_configs('nway'))
    assert sweep['lazy_maml_20way'].meta.k_eval == 15 and sweep['maml_20way'].meta.k_eval == 10
    # a lazy run is evaluated with its own k: the student takes k steps on every meta-test task
    cfg = base_config('sinusoid', quick=True, method='lazy_maml', inner_steps=4, iterations=2, eval_tasks=5)
    r = meta_train(cfg)
    assert r.test['eval_steps'] == 4
    batch = task_sampler(cfg, 'test').sample_batch(3, 0)
    assert adapt_batch(r.model, batch, cfg.meta)['inner_losses'].shape == (3, 5)


def test_validation_source_switch():
    xtr, ytr, xv, yv, _, _ = _task()
    v = task_views(MetaConfig(method='maml', val_source='shared'), xtr, ytr, xv, yv)
    assert len(v[0]) == len(xtr) + len(xv)                                        # the same K + 1 for every method
    v = task_views(MetaConfig(method='lazy_maml', val_source='shared'), xtr, ytr, xv, yv)
    assert len(v[0]) == len(xtr) and torch.equal(v[2], xv)
    v = task_views(MetaConfig(method='lazy_maml', val_source='support'), xtr, ytr, xv, yv)
    assert torch.equal(v[2], xtr) and torch.equal(v[3], ytr)                      # K for every method: γ on the support set
    v = task_views(MetaConfig(method='maml', val_source='paper'), xtr, ytr, xv, yv)
    assert len(v[0]) == len(xtr)                                                  # the published protocol
    with pytest.raises(ConfigError, match='val_source'): MetaConfig.from_dict({'val_source': 'both'})


def _bn_by_hand(p, x, n):
    "Linear → BatchNorm normalising every row with the first n rows' mean and biased variance → tanh → linear."
    h = x @ p['0.weight'].T + p['0.bias']
    mu = h[:n].mean(0); var = ((h[:n] - mu) ** 2).mean(0)
    h = (h - mu) / torch.sqrt(var + 1e-5) * p['1.weight'] + p['1.bias']
    return torch.tanh(h) @ p['3.weight'].T + p['3.bias']


@pytest.mark.parametrize('method,steps', [('maml', 2), ('fomaml', 3)])
def test_bn_support_gradient_equals_its_objective(method, steps):
    "bn='support': query normalised with the support set's statistics — the gradient includes those statistics."
    m = _tiny(3, bn=True); th, bf = split_state(m)
    xtr, ytr, _, _, xq, yq = _task(4)
    cfg = MetaConfig(method=method, inner_steps=steps, inner_lr=0.5, bn='support', val_source='paper')
    got, _ = task_meta_grad(m, th, bf, xtr, ytr, xtr[:3], ytr[:3], xq, yq, cfg)
    names = list(th); ts = [th[k].clone().requires_grad_() for k in names]
    ph = dict(zip(names, ts))
    for _ in range(steps):
        gs = torch.autograd.grad(F.cross_entropy(_bn_by_hand(ph, xtr, 6), ytr), list(ph.values()), create_graph=method == 'maml')
        ph = {k: v - 0.5 * (g if method == 'maml' else g.detach()) for (k, v), g in zip(ph.items(), gs)}
    if method == 'fomaml': ph = {k: v.detach().requires_grad_() for k, v in ph.items()}
    lq = F.cross_entropy(_bn_by_hand(ph, torch.cat([xtr, xq]), 6)[6:], yq)
    ref = torch.autograd.grad(lq, ts if method == 'maml' else list(ph.values()))
    for k, r in zip(names, ref): torch.testing.assert_close(got[k], r, atol=1e-10, rtol=0)


def test_inner_optimisers_metasgd_anil_and_imaml():
    p0 = torch.randn(4, 3); gs = [torch.randn(4, 3) for _ in range(3)]
    for opt, make in (('momentum', lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9)), ('adam', lambda p: torch.optim.Adam([p], lr=0.1))):
        p, st = {'w': p0}, inner_state(opt, {'w': p0})
        for t, g in enumerate(gs, 1): p, st = inner_update(opt, p, {'w': g}, st, 0.1, t)
        q = nn.Parameter(p0.clone()); o = make(q)
        for g in gs: q.grad = g.clone(); o.step()
        torch.testing.assert_close(p['w'], q.detach(), atol=1e-6, rtol=0)
    # Meta-SGD: the rates get a meta-gradient (finite differences); ANIL adapts the head only
    m = _tiny(); xtr, ytr, xv, yv, xq, yq = _task()
    ms = MetaSGD(_tiny(), lr=0.3).double(); th, bf = split_state(ms)
    cfg = MetaConfig(method='metasgd', inner_steps=2, inner_lr=0.3, val_source='paper')
    g, _ = task_meta_grad(ms, th, bf, xtr, ytr, xv, yv, xq, yq, cfg)
    def q(d):
        t2 = dict(th); t2['lrs.0-weight'] = th['lrs.0-weight'] + d
        return F.cross_entropy(functional_call(ms, student(ms, t2, bf, xtr, ytr, cfg, 2)[0], (xq,)), yq)
    e = torch.zeros(5, 2, dtype=torch.float64); e[2, 1] = 1e-6
    assert abs(float(g['lrs.0-weight'][2, 1]) - float((q(e) - q(-e)) / 2e-6)) < 1e-7
    tha, bfa = split_state(m)
    phi, _, _ = student(m, tha, bfa, xtr, ytr, MetaConfig(method='anil', inner_steps=3, inner_lr=0.5), 3)
    assert torch.equal(phi['0.weight'], tha['0.weight']) and not torch.equal(phi['2.weight'], tha['2.weight'])
    # iMAML: conjugate gradients equal the exact solve of (I + H/λ) v = ∇L_q at the proximal solution
    ci = MetaConfig(method='imaml', inner_steps=300, inner_lr=0.1, imaml_lambda=2.0, cg_steps=40, val_source='paper')
    g_im, _ = task_meta_grad(m, tha, bfa, xtr, ytr, xv, yv, xq, yq, ci)
    phi, _, _ = student(m, tha, bfa, xtr, ytr, ci, 300)
    names = list(tha); sizes = [tha[k].numel() for k in names]
    unflat = lambda z: dict(zip(names, [t.reshape(tha[k].shape) for k, t in zip(names, torch.split(z, sizes))]))
    flat = lambda d: torch.cat([d[k].reshape(-1) for k in names])
    H = torch.autograd.functional.hessian(lambda z: F.cross_entropy(functional_call(m, unflat(z), (xtr,)), ytr), flat(phi))
    z = flat(phi).requires_grad_()
    gq = torch.autograd.grad(F.cross_entropy(functional_call(m, unflat(z), (xq,)), yq), z)[0]
    exact = torch.linalg.solve(torch.eye(len(gq), dtype=torch.float64) + H / 2.0, gq)
    torch.testing.assert_close(flat(g_im), exact, atol=1e-8, rtol=0)
    # the proximal solution satisfies its stationarity condition ∇L_tr(φ) + λ(φ − θ) = 0
    gl = torch.autograd.grad(F.cross_entropy(functional_call(m, unflat(z), (xtr,)), ytr), z)[0]
    assert float((gl + 2.0 * (z.detach() - flat(tha))).abs().max()) < 1e-6


def test_gamma_edge_is_reported(caplog):
    cfg = MetaConfig(method='lazy_maml')
    s = gamma_summary(torch.tensor([0.75] * 7 + [0.8, 0.9, 0.95]), cfg)
    assert s['low_edge'] == 0.7 and s['high_edge'] == 0.1 and abs(sum(s['hist'].values()) - 1) < 1e-9
    with caplog.at_level(logging.WARNING, logger='medssm'):
        assert 'widen --gamma-min' in warn_gamma_edge(s, cfg)
    assert warn_gamma_edge(gamma_summary(torch.tensor([0.85, 0.8]), cfg), cfg) is None


def test_meta_commands_default_to_one_thread(monkeypatch, capsys):
    from medssm.cli import main
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    torch.set_num_threads(2)
    rc = main(['bench', 'meta', '--k', '1', '--methods', 'lazy_maml', '--image-size', '16', '--hidden', '4', '--json'])
    assert rc == 0 and torch.get_num_threads() == 1, capsys.readouterr().err
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
