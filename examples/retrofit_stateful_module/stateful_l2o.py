"""A user's learned optimizer that keeps its recurrent state inside itself.

Much L2O code is written this way: the LSTM state lives in ``self.hx`` / ``self.cx``,
``forward(x)`` takes only the features, and the training script resets the state with
a method of the module (here ``reset_lstm``, which needs the number of coordinates and
the device from that script). The features are the log/sign-preprocessed gradient,
with ε inside the log, followed by the parameter value itself.

Nothing here imports flat-l2o; ``meta_train.toml`` beside it is all the retrofit takes.
The adapter holds the state per trajectory and never calls ``reset_lstm``.
"""

import torch
from torch import nn


class MetaOptimizer(nn.Module):
    def __init__(self, hidden_size=20, num_layers=2):
        super().__init__()
        sizes = [3] + [hidden_size] * num_layers       # (log|g|/p, sign g, θ)
        self.cells = nn.ModuleList(nn.LSTMCell(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(hidden_size, 1)
        self.hidden_size = hidden_size
        self.hx = None
        self.cx = None

    def reset_lstm(self, num_coordinates, device):
        self.hx = [torch.zeros(num_coordinates, self.hidden_size, device=device) for _ in self.cells]
        self.cx = [torch.zeros(num_coordinates, self.hidden_size, device=device) for _ in self.cells]

    def forward(self, x):
        hx, cx = [], []
        for cell, h, c in zip(self.cells, self.hx, self.cx):
            h, c = cell(x, (h, c))
            hx.append(h)
            cx.append(c)
            x = h
        self.hx, self.cx = hx, cx
        return self.head(x)
