"""torch eager twins of the models of :mod:`smallchains.models`, for the benchmarks and
tests: the same network, loading smallchains' parameters (``from_chain``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class LSTNet(nn.Module):
    """:func:`smallchains.models.lstnet` in torch (input ``(N, T, F)``, output ``(N, 1)``)."""

    def __init__(self, n_series, window, conv_filters=2, conv_width=3, hidden=3, skip=4,
                 skip_hidden=3, highway=4, target=0, dtype=torch.float32):
        super().__init__()
        self.T, self.C, self.skip, self.hw, self.target = window, conv_filters, skip, highway, target
        self.Tc = window - conv_width + 1
        kw = dict(dtype=dtype)
        self.conv = nn.Conv2d(1, conv_filters, (conv_width, n_series), **kw)
        self.gru = nn.GRU(conv_filters, hidden, batch_first=True, **kw)
        self.skip_gru = nn.GRU(conv_filters, skip_hidden, batch_first=True, **kw)
        self.out = nn.Linear(hidden + skip * skip_hidden, 1, **kw)
        self.highway = nn.Linear(highway, 1, **kw)

    def forward(self, x):
        N = x.shape[0]
        c = torch.relu(self.conv(x[:, None])).squeeze(3).permute(0, 2, 1)  # (N, Tc, C)
        r = self.gru(c)[1][0]
        n = self.Tc // self.skip
        s = c[:, self.Tc - n * self.skip:].reshape(N, n, self.skip, self.C)
        s = s.permute(0, 2, 1, 3).reshape(N * self.skip, n, self.C)
        s = self.skip_gru(s)[1][0].reshape(N, -1)
        y = self.out(torch.cat([r, s], 1))
        return y + self.highway(x[:, self.T - self.hw:, self.target])

    def arrays(self):
        """The parameters in smallchains' order (``from_chain`` / gradients)."""
        g, sg = self.gru, self.skip_gru
        return [self.conv.weight, self.conv.bias,  # (C, 1, K, F) = Conv1D W (C, K, F)
                g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0,
                sg.weight_ih_l0, sg.weight_hh_l0, sg.bias_ih_l0, sg.bias_hh_l0,
                self.out.weight, self.out.bias, self.highway.weight, self.highway.bias]

    def from_flat(self, p):
        """Load smallchains' flat parameter vector ``p`` (same order as :meth:`arrays`)."""
        off = 0
        with torch.no_grad():
            for a in self.arrays():
                n = a.numel()
                a.copy_(torch.from_numpy(np.asarray(p[off:off + n], np.float64)).reshape(a.shape))
                off += n
        assert off == len(p), (off, len(p))
        return self

    def flat_grad(self):
        return np.concatenate([a.grad.detach().numpy().ravel() for a in self.arrays()])


class TPALSTM(nn.Module):
    """:func:`smallchains.models.tpa_lstm` in torch (input ``(N, T, F)``, output ``(N, n_out)``)."""

    def __init__(self, n_series, window, hidden=10, layers=2, filters=32, n_out=1,
                 dtype=torch.float32):
        super().__init__()
        kw = dict(dtype=dtype)
        self.embed = nn.Linear(n_series, hidden, **kw)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True, **kw)
        self.C = nn.Parameter(torch.zeros(filters, window - 1, **kw))
        self.c = nn.Parameter(torch.zeros(filters, **kw))
        self.W_a = nn.Parameter(torch.zeros(filters, hidden, **kw))
        self.W_h = nn.Parameter(torch.zeros(hidden, hidden, **kw))
        self.W_v = nn.Parameter(torch.zeros(hidden, filters, **kw))
        self.out = nn.Linear(hidden, n_out, **kw)

    def forward(self, x):
        hs = self.lstm(torch.relu(self.embed(x)))[0]            # (N, T, m)
        H, h = hs[:, :-1], hs[:, -1]
        hc = torch.einsum("nli,jl->nij", H, self.C) + self.c    # (N, m, k)
        alpha = torch.sigmoid(torch.einsum("nij,nj->ni", hc, h @ self.W_a.T))
        v = torch.einsum("ni,nij->nj", alpha, hc)
        return self.out(h @ self.W_h.T + v @ self.W_v.T)

    def arrays(self):
        rnn = [getattr(self.lstm, f"{n}_l{k}") for k in range(self.lstm.num_layers)
               for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        return ([self.embed.weight, self.embed.bias] + rnn
                + [self.C, self.c, self.W_a, self.W_h, self.W_v, self.out.weight, self.out.bias])

    from_flat = LSTNet.from_flat
    flat_grad = LSTNet.flat_grad
