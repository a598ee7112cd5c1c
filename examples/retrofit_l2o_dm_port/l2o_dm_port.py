"""A user's own L2O-DM port: the file flat-l2o retrofits, unchanged.

It is written the way public PyTorch re-implementations of Andrychowicz et al. (2016)
are: a class ``Optimizer(nn.Module)`` with two ``LSTMCell``s of 20 units, optional
log/sign preprocessing of its own (ε inside the log), and a
``forward(inp, hidden, cell) -> (update, hidden, cell)`` that takes the two halves of
its recurrent state as separate arguments. Its own training script multiplies the
update by 0.1 and keeps one ``hidden`` and one ``cell`` list per parameter tensor.

Nothing here imports flat-l2o; ``meta_train.toml`` beside it is all the retrofit takes.
"""

import math

import torch
from torch import nn


class Optimizer(nn.Module):
    def __init__(self, preproc=False, hidden_sz=20, preproc_factor=10.0):
        super().__init__()
        self.hidden_sz = hidden_sz
        self.recurs = nn.LSTMCell(2 if preproc else 1, hidden_sz)
        self.recurs2 = nn.LSTMCell(hidden_sz, hidden_sz)
        self.output = nn.Linear(hidden_sz, 1)
        self.preproc = preproc
        self.preproc_factor = preproc_factor
        self.preproc_threshold = math.exp(-preproc_factor)

    def preprocess(self, grad):
        # (log|g| / p, sign g) for gradients above e^-p, (-1, e^p g) below.
        keep = grad.abs() >= self.preproc_threshold
        scaled_log = torch.log(grad.abs() + 1e-8) / self.preproc_factor
        first = torch.where(keep, scaled_log, torch.full_like(grad, -1.0))
        second = torch.where(keep, torch.sign(grad), math.exp(self.preproc_factor) * grad)
        return torch.cat([first, second], dim=1)

    def forward(self, inp, hidden, cell):
        if self.preproc:
            inp = self.preprocess(inp.detach())
        hidden0, cell0 = self.recurs(inp, (hidden[0], cell[0]))
        hidden1, cell1 = self.recurs2(hidden0, (hidden[1], cell[1]))
        return self.output(hidden1), (hidden0, hidden1), (cell0, cell1)
