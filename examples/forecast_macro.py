"""Forecast US inflation one quarter ahead with LSTNet and TPA-LSTM on real data.

    python examples/forecast_macro.py [--epochs 300] [--target infl] [--compare-torch]
                                      [--plot docs/img/forecast_macro.png]

Data: statsmodels' ``macrodata`` (US quarterly macroeconomic series 1959Q1-2009Q3, 203
quarters, shipped inside the statsmodels package: no download). The 12 series are made
roughly stationary (log-differences x 100 for the eight level series: real GDP,
consumption, investment, government spending, disposable income, CPI, M1, population;
the interest rates, unemployment, inflation and real interest rate as they are), then
z-scored with the training period's mean and standard deviation.

Samples: windows of ``--window`` quarters of all 12 series; target: series ``--target``
``--horizon`` quarters after the window's end. The first 75% of the windows (in time
order) train, the rest test. Both models are trained full-batch with Adam; the test
RMSE (in the target's z-score units) is printed beside the naive forecast (the last
value in the window). With ``--compare-torch`` the same models (bench/torch_models.py)
are trained in torch eager from the same initial parameters and their RMSE printed too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

SERIES = ["realgdp", "realcons", "realinv", "realgovt", "realdpi", "cpi", "m1", "tbilrate",
          "unemp", "pop", "infl", "realint"]
LOG_DIFF = {"realgdp", "realcons", "realinv", "realgovt", "realdpi", "cpi", "m1", "pop"}


def load(window, horizon, target, train_fraction=0.75):
    """``(Xtr, ytr, Xte, yte, naive_te)`` float32: windows ``(n, window, 12)``, targets
    ``(n, 1)``, and the last-value forecast of the test windows."""
    import statsmodels.api as sm

    df = sm.datasets.macrodata.load_pandas().data
    cols = []
    for name in SERIES:
        v = df[name].to_numpy(np.float64)
        cols.append(100 * np.diff(np.log(v)) if name in LOG_DIFF else v[1:])
    Z = np.stack(cols, axis=1)                                   # (202, 12)
    j = SERIES.index(target)
    n = len(Z) - window - horizon + 1
    n_train = int(train_fraction * n)
    # statistics of the quarters the training windows and targets cover
    seen = Z[:n_train + window + horizon - 1]
    Z = (Z - seen.mean(0)) / seen.std(0)
    X = np.stack([Z[i:i + window] for i in range(n)]).astype(np.float32)
    y = np.array([[Z[i + window + horizon - 1, j]] for i in range(n)], np.float32)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:], X[n_train:, -1, j:j + 1]


def rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def models(n_series, window, target):
    from smallchains.models import lstnet, tpa_lstm
    return {"LSTNet": lstnet(n_series, window, target=target),
            "TPA-LSTM": tpa_lstm(n_series, window, hidden=8, filters=8)}


def train_smallchains(chain, Xtr, ytr, epochs, lr, seed):
    import smallchains as sc
    model = sc.add_loss(chain, sc.SquaredLoss(ytr))
    p = sc.init_params(chain, seed=seed)
    p0 = p.copy()
    G = sc.alloc_threaded_grad(chain)
    sc.train_unbatched(G, p.copy(), model, Xtr, sc.Adam(lr), 1)  # compile (not timed)
    t0 = time.perf_counter()
    sc.train_unbatched(G, p, model, Xtr, sc.Adam(lr), epochs)
    return p0, p, time.perf_counter() - t0


def train_torch(name, p0, Xtr, ytr, Xte, window, epochs, lr, target):
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    import torch_models
    if name == "LSTNet":
        net = torch_models.LSTNet(Xtr.shape[2], window, target=target)
    else:
        net = torch_models.TPALSTM(Xtr.shape[2], window, hidden=8, filters=8)
    net.from_flat(p0)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x, y = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    t0 = time.perf_counter()  # (torch's first step, included, is its warm-up)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        (((net(x) - y) ** 2).sum() / len(x)).backward()
        opt.step()
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        return net(torch.from_numpy(Xte)).numpy(), elapsed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=300, help="full-batch Adam steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--horizon", type=int, default=1)
    ap.add_argument("--target", choices=SERIES, default="infl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-torch", action="store_true")
    ap.add_argument("--plot", default=None, help="write forecast vs truth (PNG) here")
    args = ap.parse_args(argv)

    Xtr, ytr, Xte, yte, naive = load(args.window, args.horizon, args.target)
    print(f"macrodata: {len(Xtr)} training / {len(Xte)} test windows of {args.window} quarters x "
          f"{Xtr.shape[2]} series; target {args.target!r}, {args.horizon} quarter(s) ahead")
    print(f"naive last-value forecast: test RMSE {rmse(naive, yte):.3f} (z-score units)")
    results = {"naive": (naive, rmse(naive, yte))}
    j = SERIES.index(args.target)
    for name, chain in models(Xtr.shape[2], args.window, j).items():
        p0, p, secs = train_smallchains(chain, Xtr, ytr, args.epochs, args.lr, args.seed)
        pred = chain(Xte, p)
        results[name] = (pred, rmse(pred, yte))
        line = (f"{name:9s} smallchains: test RMSE {results[name][1]:.3f}, train RMSE "
                f"{rmse(chain(Xtr, p), ytr):.3f} ({args.epochs} Adam steps in {secs:.2f} s, "
                "after compiling)")
        if args.compare_torch:
            tpred, tsecs = train_torch(name, p0, Xtr, ytr, Xte, args.window, args.epochs, args.lr, j)
            results[name + " (torch)"] = (tpred, rmse(tpred, yte))
            line += f"; torch: test RMSE {rmse(tpred, yte):.3f} ({tsecs:.2f} s)"
        print(line)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(yte[:, 0], "k-", lw=2, label="truth")
        for name, (pred, err) in results.items():
            if "torch" not in name:
                ax.plot(np.asarray(pred)[:, 0], label=f"{name} (RMSE {err:.2f})")
        ax.set_xlabel("test quarter")
        ax.set_ylabel(f"{args.target} (z-score)")
        ax.set_title(f"US macrodata: {args.target}, {args.horizon} quarter(s) ahead")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot written to {args.plot}")
    return results


if __name__ == "__main__":
    main()
