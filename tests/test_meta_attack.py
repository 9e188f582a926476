"""Meta-attack (paper 3, section 5.3): the attack step against Du et al.'s coordinate-wise Adam in tanh space, query
counting, budgets and unqueryable targets, and the `medssm meta attack` pipeline (targets → ZOO gradients → Reptile /
lazy Reptile attacker with an inner Adam → attacks) end to end."""
import json

import pytest
import torch
import torch.nn as nn

from medssm.core import ConfigError, InputError
from medssm.meta.attack import (ATTACK_METHODS, AttackConfig, AttackerTrainConfig, MetaAttacker, QueryBudgetExceeded,
                                QueryCounter, attack_image, coordinate_adam, from_tanh_space, margin_loss, to_tanh_space,
                                zoo_gradient)



class Recorder(nn.Module):
    "A black box that records the size of every batch it is asked about."
    def __init__(self):
        super().__init__(); torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)); self.sizes = []
    def forward(self, x): self.sizes.append(len(x)); return self.net(x)


def test_zoo_costs_two_queries_per_coordinate():
    box = Recorder(); qc = QueryCounter(box)
    x = torch.rand(1, 8, 8)
    zoo_gradient(lambda z: margin_loss(qc(z), torch.zeros(len(z), dtype=torch.long)), x, torch.tensor([1, 5, 9]))
    assert qc.queries == 6 == sum(box.sizes)


@pytest.mark.parametrize('meta', [False, True])
def test_attack_counts_every_query(meta):
    box = Recorder(); x = torch.rand(1, 8, 8)
    y = int(box(x[None]).argmax()); box.sizes.clear()
    cfg = AttackConfig(const=1e-6, lr=1e-6, max_iters=6, coords=3, finetune_every=4, max_queries=10_000)   # tiny steps: never succeeds
    r = attack_image(QueryCounter(box), x, y, cfg, MetaAttacker(1, 4) if meta else None)
    assert not r.success and r.queries == sum(box.sizes)
    # 1 query for the original, 1 per iterate, 2·q per ZOO round (every iteration for ZOO, iterations 0 and 4 for meta)
    assert r.queries == 1 + 6 + (2 if meta else 6) * 2 * 3
    assert r.l2 < 1e-3


def test_budget_is_never_exceeded():
    box = Recorder(); x = torch.rand(1, 8, 8)
    y = int(box(x[None]).argmax()); box.sizes.clear()
    r = attack_image(QueryCounter(box, budget=20), x, y, AttackConfig(const=1e-6, lr=1e-6, max_queries=20, coords=4))
    assert r.queries <= 20 and sum(box.sizes) == r.queries
    qc = QueryCounter(box, budget=3)
    with pytest.raises(QueryBudgetExceeded): qc(torch.rand(4, 1, 8, 8))
    assert qc.queries == 0


def test_bad_targets_and_budgets():
    with pytest.raises(InputError, match='cannot be queried'): QueryCounter(None)
    with pytest.raises(InputError, match='cannot be queried'): QueryCounter(lambda x: x)(torch.rand(2, 1, 8, 8))
    def broken(x): raise RuntimeError('connection refused')
    with pytest.raises(InputError, match='connection refused'): QueryCounter(broken)(torch.rand(2, 1, 8, 8))
    with pytest.raises(InputError, match='non-finite'): QueryCounter(lambda x: torch.full((len(x), 3), float('nan')))(torch.rand(1, 1, 8, 8))
    with pytest.raises(ConfigError, match='positive'): QueryCounter(Recorder(), budget=0)
    with pytest.raises(ConfigError, match='--const'): AttackConfig(const=-1.0).check()
    with pytest.raises(ConfigError, match='--beta1'): AttackConfig(beta1=1.0).check()
    box = Recorder(); x = torch.rand(1, 8, 8); wrong = (int(box(x[None]).argmax()) + 1) % 10
    with pytest.raises(InputError, match='already classified'): attack_image(QueryCounter(box), x, wrong, AttackConfig())


def test_cli_attack_end_to_end(tmp_path, capsys):
    from medssm.cli import main
    torch.set_num_threads(1)
    rc = main(['meta', 'attack', '--quick', '--n-attack', '3', '--out', str(tmp_path), '--json'])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = json.loads(out.out.splitlines()[0])
    assert [row['method'] for row in rows] == list(ATTACK_METHODS)
    for row in rows:
        assert row['n'] == 3 and 0 <= row['success_rate'] <= 1
        if row['success_rate'] > 0: assert 0 < row['avg_l2'] and 0 < row['avg_queries'] <= 3000
    assert (tmp_path/'table5.csv').exists() and list((tmp_path/'figures').glob('example_net4_*.png'))
    rc = main(['meta', 'attack', '--quick', '--const', '0', '--out', str(tmp_path)])
    assert rc == 2 and 'C&W constant c must be positive' in capsys.readouterr().err


def test_cli_attack_flags(tmp_path, capsys):
    "Old flags stay as aliases; nested loops get prefixed flags; a bad value is one error line before anything runs."
    from medssm.cli import main
    from medssm.meta.cli import MetaAttackOptions
    import argparse
    from medssm.cli import add_options
    p = argparse.ArgumentParser(); add_options(p, MetaAttackOptions, {'--target-epochs': 'targets.max_epochs', '--meta-lr': 'attacker.fit.lr'})
    ns = vars(p.parse_args(['--target-epochs', '3', '--meta-lr', '0.1', '--attacker-fit-max-epochs', '2', '--attack-seed', '5']))
    assert ns['opt:targets.max_epochs'] == 3 and ns['opt:attacker.fit.lr'] == 0.1 and ns['opt:attack.seed'] == 5
    rc = main(['meta', 'attack', '--quick', '--zoo-images', '2', '--out', str(tmp_path/'a')])
    err = capsys.readouterr().err
    assert rc == 2 and '--zoo-images 2' in err and err.count('error:') == 1 and not (tmp_path/'a').exists(), err


def _du_coordinate_adam(w, idx, g, mt, vt, epoch, lr, beta1, beta2):
    "Du et al.'s `coordinate_ADAM` (MetaAttack_ICLR2020, attacks/cw_black.py), transcribed on copies."
    w, mt, vt, epoch = w.clone(), mt.clone(), vt.clone(), epoch.clone()
    mt[idx] = beta1 * mt[idx] + (1 - beta1) * g
    vt[idx] = beta2 * vt[idx] + (1 - beta2) * (g * g)
    corr = torch.sqrt(1 - torch.pow(beta2, epoch[idx])) / (1 - torch.pow(beta1, epoch[idx]))
    w[idx] = w[idx] - lr * corr * mt[idx] / (torch.sqrt(vt[idx]) + 1e-8)
    epoch[idx] = epoch[idx] + 1
    return w, mt, vt, epoch


@pytest.mark.parametrize('betas', [(0.9, 0.999), (0.0, 0.0)])
def test_coordinate_adam_is_du_et_als_update(betas):
    torch.manual_seed(0)
    w = torch.randn(30, dtype=torch.float64)
    state = {'m': torch.zeros(30, dtype=torch.float64), 'v': torch.zeros(30, dtype=torch.float64), 't': torch.ones(30, dtype=torch.float64)}
    ref = (w.clone(), state['m'].clone(), state['v'].clone(), state['t'].clone())
    for idx in (torch.tensor([0, 3, 5]), torch.tensor([3, 7]), torch.tensor([0, 3, 29])):   # coordinates revisited: own step counts
        g = torch.randn(len(idx), dtype=torch.float64)
        coordinate_adam(w, idx, g, state, 0.02, *betas)
        ref = _du_coordinate_adam(ref[0], idx, g, *ref[1:], 0.02, *betas)
    torch.testing.assert_close(w, ref[0], atol=1e-14, rtol=0)
    torch.testing.assert_close(state['t'], ref[3])


class _Linear2(nn.Module):
    "A two-class linear black box: its log-probability margin is linear, so ZOO's estimate is exact."
    def __init__(self):
        super().__init__(); torch.manual_seed(3); self.lin = nn.Linear(9, 2)
    def forward(self, x): return self.lin(x.flatten(1))


def test_attack_step_equals_du_et_als_update_on_a_toy_model():
    "One ZOO iteration in tanh space: random coordinates, C&W gradient through tanh, coordinate Adam — by hand."
    box = _Linear2().double()
    x = torch.rand(1, 3, 3, dtype=torch.float64) * 0.8 + 0.1
    y = int(box(x[None]).argmax())
    cfg = AttackConfig(const=3.0, lr=0.05, coords=4, max_iters=1, seed=7)
    r = attack_image(QueryCounter(box), x, y, cfg)
    # the coordinates ZOO drew (same generator as the attack), then everything by hand
    from medssm.core import derive_seed
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 'attack', float(x.sum())))
    idx = torch.randperm(9, generator=gen)[:4]
    W = box.lin.weight.detach()
    g_f = (W[y] - W[1 - y])[idx]                                   # ∂/∂x of log p_y − log p_other for two classes
    w = torch.atanh((2 * x.flatten() - 1) * (1 - 1e-6))
    x0 = (torch.tanh(w) + 1) / 2
    g_w = (2 * (x0[idx] - x.flatten()[idx]) + cfg.const * g_f) * (1 - torch.tanh(w[idx]) ** 2) / 2   # ∂F/∂w, F = ‖x′ − x‖² + c f
    z = torch.zeros(9, dtype=torch.float64)
    w_new, *_ = _du_coordinate_adam(w, idx, g_w, z, z, torch.ones(9, dtype=torch.float64), cfg.lr, cfg.beta1, cfg.beta2)
    torch.testing.assert_close(r.adversarial.flatten(), (torch.tanh(w_new) + 1) / 2, atol=1e-9, rtol=0)
    assert r.queries == 1 + 2 * 4 + 1
    torch.testing.assert_close(from_tanh_space(to_tanh_space(x)), x, atol=1e-6, rtol=0)


def test_attacker_inner_loop_is_adam_and_lazy_uses_the_same_loop():
    cfg = AttackerTrainConfig()
    assert (cfg.meta.inner_opt, cfg.meta.method, cfg.meta.inner_lr) == ('adam', 'lazy_reptile', 0.01)
    assert cfg.replace(method='reptile').meta.inner_opt == 'adam'
