"""Meta-attack (paper 3, section 5.3): query counting, budgets and unqueryable targets, and the
`medssm meta attack` pipeline (targets → ZOO gradients → Reptile / lazy Reptile attacker → attacks) end to end."""
import json

import pytest
import torch
import torch.nn as nn

from medssm.core import ConfigError, InputError
from medssm.meta.attack import (ATTACK_METHODS, AttackConfig, MetaAttacker, QueryBudgetExceeded, QueryCounter,
                                attack_image, margin_loss, zoo_gradient)



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
    cfg = AttackConfig(eps=0.01, max_iters=6, coords=3, finetune_every=4, max_queries=10_000)   # tiny ε: never succeeds
    r = attack_image(QueryCounter(box), x, y, cfg, MetaAttacker(1, 4) if meta else None)
    assert not r.success and r.queries == sum(box.sizes)
    # 1 query for the original, 1 per iterate, 2·q per ZOO round (every iteration for ZOO, iterations 0 and 4 for meta)
    assert r.queries == 1 + 6 + (2 if meta else 6) * 2 * 3
    assert r.l2 <= 0.01 + 1e-6


def test_budget_is_never_exceeded():
    box = Recorder(); x = torch.rand(1, 8, 8)
    y = int(box(x[None]).argmax()); box.sizes.clear()
    r = attack_image(QueryCounter(box, budget=20), x, y, AttackConfig(eps=0.01, max_queries=20, coords=4))
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
    with pytest.raises(ConfigError, match='L2 budget'): AttackConfig(eps=-1.0).check()
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
        if row['success_rate'] > 0: assert 0 < row['avg_l2'] <= 3.0 + 1e-6 and 0 < row['avg_queries'] <= 3000
    assert (tmp_path/'table5.csv').exists() and list((tmp_path/'figures').glob('example_net4_*.png'))
    rc = main(['meta', 'attack', '--quick', '--eps', '0', '--out', str(tmp_path)])
    assert rc == 2 and 'L2 budget must be positive' in capsys.readouterr().err


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
