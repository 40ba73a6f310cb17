"""Concurrent use from several Python threads: training different chains at the same time
and evaluating one chain at the same time give exactly the serial results, with the
threading layer numba picked here and with ``workqueue`` (not thread-safe: smallchains
then serializes the parallel launches, see ``smallchains.compiler.loops.call``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numba
import numpy as np

import smallchains as sc
from smallchains.compiler import loops
from conftest import make_data, make_model, random_params

REPEATS = 30  # calls per thread: keeps both threads inside compiled code at once


def run_concurrently(*fns):
    """Call each ``fn`` in its own thread, all released together; returns their results
    in order and re-raises the first exception of any of them."""
    barrier = threading.Barrier(len(fns))
    results = [None] * len(fns)
    errors = []

    def target(i):
        try:
            barrier.wait()
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 -- re-raised in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _training_jobs():
    """Two independent training runs on different chains (all inputs made here)."""
    jobs = []
    for name, seed in (("deep", 0), ("clf", 1)):
        X, T = make_data(name, 200, seed=seed)
        model = make_model(name, T)
        p0 = random_params(model.chain, seed=seed)

        def job(model=model, X=X, p0=p0):
            G = sc.alloc_threaded_grad(model.chain, n_threads=2, dtype=np.float64)
            p, opt = p0.copy(), sc.Adam(1e-2)
            h = sc.train_unbatched(G, p, model, X, opt, 200)
            hb = sc.train_batched(G, p, model, X, opt, 5, batch_size=32, seed=3)
            return p, h, hb, opt.state.copy(), opt.t
        jobs.append(job)
    return jobs


def _assert_same(got, want):
    """Bitwise equal, through nested lists and tuples."""
    if isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want)
        for a, b in zip(got, want):
            _assert_same(a, b)
    else:
        np.testing.assert_array_equal(got, want)


def test_two_threads_train_different_chains():
    jobs = _training_jobs()
    serial = [job() for job in jobs]
    for _ in range(2):
        _assert_same(run_concurrently(*jobs), serial)


def test_two_threads_evaluate_one_chain():
    X, T = make_data("deep", 300, seed=2)
    model = make_model("deep", T)
    p = random_params(model.chain, seed=2)
    Xs = [X, X[::-1].copy()]  # different inputs per thread

    def job(i):
        def run():
            out = []
            for _ in range(REPEATS):
                out.append((model.chain(Xs[i], p), model(Xs[i], p), *sc.valgrad(model, X, p)))
            return out
        return run

    serial = [(model.chain(x, p), model(x, p), *sc.valgrad(model, X, p)) for x in Xs]
    for i, runs in enumerate(run_concurrently(job(0), job(1))):
        for got in runs:
            _assert_same(got, serial[i])


def test_launch_lock_only_for_layers_that_are_not_threadsafe():
    X, T = make_data("deep", 20, seed=0)
    make_model("deep", T).chain(X, random_params(make_model("deep", T).chain))
    layer = numba.threading_layer()
    assert loops._serialize is (layer not in loops.THREADSAFE_LAYERS)


SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import numba
import numpy as np
import smallchains as sc
from smallchains.compiler import loops
from test_threads import _assert_same, _training_jobs, run_concurrently, make_data, make_model, random_params

jobs = _training_jobs()
serial = [job() for job in jobs]
assert numba.threading_layer() == "workqueue", numba.threading_layer()
for _ in range(2):
    _assert_same(run_concurrently(*jobs), serial)

X, T = make_data("deep", 300, seed=2)
model = make_model("deep", T)
p = random_params(model.chain, seed=2)
want = model.chain(X, p)

def evaluate():
    return [model.chain(X, p) for _ in range(50)]

for runs in run_concurrently(evaluate, evaluate):
    for got in runs:
        np.testing.assert_array_equal(got, want)
assert getattr(loops, "_serialize", None) is True  # the launches did take the lock
print("ok")
"""


def test_workqueue_layer_is_serialized():
    """numba's workqueue layer aborts the process on concurrent parallel launches
    ("Numba workqueue threading layer is terminating: Concurrent access has been
    detected.") unless they are serialized. In a subprocess: the layer is chosen once per
    process."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    tests = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", SCRIPT, tests], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "ok"
