"""Train a small MLP on the digits with the shared loop; used by the kill/resume and torchrun tests.
Usage: python fit_digits.py RUN_DIR EPOCHS [--sleep SECONDS_PER_BATCH] [--ranks-out DIR]"""
import argparse, json, os, time
import torch
from torch import nn
from medssm.core import seed_everything
from medssm.data import load_digits_arrays, ArrayDataset, stratified_split
from medssm.metrics import accuracy
from medssm.train import FitConfig, fit, classification_step, dist_info

p = argparse.ArgumentParser()
p.add_argument('run'); p.add_argument('epochs', type=int)
p.add_argument('--sleep', type=float, default=0.0)
p.add_argument('--ranks-out', default=None)
a = p.parse_args()
torch.set_num_threads(1)

X, Y = load_digits_arrays(); X = X.reshape(len(X), -1)
tr, va = stratified_split(Y, (0.8, 0.2), seed=0)
seed_everything(0)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))

def slow_step(model, batch):
    if a.sleep: time.sleep(a.sleep)      # stretch the run so a kill lands at an arbitrary point
    return classification_step(model, batch)

cfg = FitConfig(max_epochs=a.epochs, batch_size=32, lr=2e-3, lookahead_k=3, plateau_factor=0.5, plateau_patience=1,
                progress=False, seed=1)
res = fit(model, ArrayDataset(X[tr], Y[tr]), ArrayDataset(X[va], Y[va]), config=cfg, step=slow_step,
          metrics={'acc': accuracy}, run=a.run)
if a.ranks_out:
    rank = dist_info()[0]
    os.makedirs(a.ranks_out, exist_ok=True)
    with open(os.path.join(a.ranks_out, f'rank{rank}.json'), 'w') as f:
        json.dump({'checksum': float(sum(p.double().sum() for p in res.model.parameters())),
                   'epochs': len(res.history), 'val_acc': res.history[-1]['val_acc']}, f)
