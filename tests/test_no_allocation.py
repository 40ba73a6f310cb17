"""The training loops allocate nothing per iteration (numba runtime allocation counts).

NRT statistics must be switched on before numba is imported, so the measurement runs in
a subprocess with ``NUMBA_NRT_STATS=1``.
"""

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json
import numpy as np
import smallchains as sc
sc.train.CHUNK_SECONDS = None  # one compiled call per run (the allocation count is per call)
from numba.core.runtime import rtsys

X = np.random.default_rng(1).standard_normal((3000, 4)).astype(np.float32)
chain = sc.SimpleChain(4, sc.TurboDense(32, "tanh"), sc.TurboDense(16, "tanh"), sc.TurboDense(4))
p = sc.init_params(chain, seed=0)
model = sc.add_loss(chain, sc.SquaredLoss(X))
G = sc.alloc_threaded_grad(chain)
opt = sc.Adam(1e-3)
sc.train_unbatched(G, p, model, X, opt, 1)          # compile
sc.train_batched(G, p, model, X, opt, 1, batch_size=256)

def count(f):
    a = rtsys.get_allocation_stats()
    f()
    b = rtsys.get_allocation_stats()
    return [b.alloc - a.alloc, b.free - a.free]

out = {
    "unbatched_1": count(lambda: sc.train_unbatched(G, p, model, X, opt, 1)),
    "unbatched_300": count(lambda: sc.train_unbatched(G, p, model, X, opt, 300)),
    "batched_1": count(lambda: sc.train_batched(G, p, model, X, opt, 1, batch_size=256)),
    "batched_1_onebatch": count(lambda: sc.train_batched(G, p, model, X, opt, 1, batch_size=3000)),
    "batched_5": count(lambda: sc.train_batched(G, p, model, X, opt, 5, batch_size=256)),
}
print(json.dumps(out))
"""


def test_training_allocates_nothing_per_iteration():
    env = dict(os.environ, NUMBA_NRT_STATS="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    counts = json.loads(res.stdout.strip().splitlines()[-1])
    # the count per call is a small constant (argument handling), independent of the
    # number of steps: 300 steps allocate exactly what 1 step does
    assert counts["unbatched_300"] == counts["unbatched_1"], counts
    # batched: one compiled call per epoch, so allocations scale with epochs, not batches
    # and 12 minibatches per epoch allocate what 1 minibatch does
    assert counts["batched_1"] == counts["batched_1_onebatch"], counts
    # epochs are separate compiled calls (reshuffle in between): at most a constant each
    assert counts["batched_5"][0] <= 5 * counts["batched_1"][0], counts
