"""fit_many on a Dask LocalCluster of two single-threaded worker processes: the results equal
the in-process ones bitwise; a worker killed mid-run has its fits rerun (complete, equal);
with no retries allowed its fits are reported as errors and the others still finish; an
unpicklable model is refused before anything is sent."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import smallchains as sc
from conftest import make_data, make_model

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

TIMEOUT = 240  # seconds: a hung cluster fails the test instead of stalling the suite


def _cluster(**config):
    with dask.config.set(config):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=":0")
        return cluster, distributed.Client(cluster)


@pytest.fixture(scope="module")
def client():
    cluster, client = _cluster()
    yield client
    client.close()
    cluster.close()


def _deep(n=60):
    X, Y = make_data("deep", n, seed=0)
    return make_model("deep", Y), X


def _run(fn, *args, **kwargs):
    with ThreadPoolExecutor(1) as ex:
        return ex.submit(fn, *args, **kwargs).result(timeout=TIMEOUT)


def _equal(a, b):
    assert a.status == b.status == "ok", (a.message, b.message)
    np.testing.assert_array_equal(a.p, b.p)
    np.testing.assert_array_equal(a.history, b.history)


def test_dask_results_equal_in_process(client):
    model, X = _deep()
    configs = [{"seed": s, "lr": 1e-3 * (1 + s % 3)} for s in range(7)]
    rows = {"seed": 50, "rows": np.arange(0, 60, 2)}
    configs.append(rows)
    local = sc.fit_many(model, X, configs, iters=30)
    remote = _run(sc.fit_many, model, X, configs, iters=30, backend=client, fits_per_task=3,
                  progress=True)
    assert all(r.config is c for r, c in zip(remote, configs))
    for a, b in zip(local, remote):
        _equal(a, b)
    batched = _run(sc.fit_many, model, X, configs[:3], epochs=2, batch_size=16, backend=client)
    for a, b in zip(sc.fit_many(model, X, configs[:3], epochs=2, batch_size=16), batched):
        _equal(a, b)


def _kill_a_busy_worker(client, done):
    """SIGKILL the process of a worker while it runs a task (its nanny restarts it)."""
    pids = client.run(os.getpid)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and not done.is_set():
        busy = [w for w, keys in client.processing().items() if keys and w in pids]
        if busy:
            time.sleep(0.05)  # the task has started (a task runs about 0.3 s)
            os.kill(pids[busy[0]], signal.SIGKILL)
            return True
        time.sleep(0.005)
    return False


def _killed_run(client, model, X, configs):
    done = threading.Event()
    with ThreadPoolExecutor(1) as ex:
        killed = ex.submit(_kill_a_busy_worker, client, done)
        try:
            res = _run(sc.fit_many, model, X, configs, iters=10_000, backend=client,
                       fits_per_task=2)
        finally:
            done.set()
        assert killed.result(timeout=TIMEOUT), "no worker was busy: nothing was killed"
    return res


def test_a_killed_worker_has_its_fits_rerun(client):
    model, X = _deep()
    configs = [{"seed": s} for s in range(12)]
    res = _killed_run(client, model, X, configs)
    for a, b in zip(sc.fit_many(model, X, configs, iters=10_000), res):
        _equal(a, b)


def test_without_retries_a_killed_task_is_an_error_and_the_others_finish():
    cluster, client = _cluster(**{"distributed.scheduler.allowed-failures": 0})
    try:
        model, X = _deep()
        configs = [{"seed": s} for s in range(12)]
        res = _killed_run(client, model, X, configs)
    finally:
        client.close()
        cluster.close()
    errors = [r for r in res if r.status == "error"]
    assert errors and all("KilledWorker" in r.message for r in errors)
    assert all(r.steps == 0 and r.config is not None for r in errors)
    for a, b in zip(sc.fit_many(model, X, configs, iters=10_000), res):
        if b.status != "error":
            _equal(a, b)


class _UnpicklableLoss(sc.SquaredLoss):
    def __reduce__(self):
        raise TypeError("this loss holds an open resource")


def test_unpicklable_model_and_thread_count_are_refused_before_sending(client):
    _, X = _deep()
    _, Y = make_data("deep", 60, seed=0)
    model = sc.add_loss(make_model("deep", Y).chain, _UnpicklableLoss(Y))
    tasks = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
    with pytest.raises(TypeError, match="cannot be pickled: this loss holds an open resource"):
        sc.fit_many(model, X, 2, iters=3, backend=client)
    assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == tasks
    with pytest.raises(TypeError, match="n_threads is for backend='threads'"):
        sc.fit_many(make_model("deep", Y), X, 2, iters=3, backend=client, n_threads=2)


def test_embedded_local_cluster():
    model, X = _deep()
    for a, b in zip(sc.fit_many(model, X, 3, iters=20),
                    _run(sc.fit_many, model, X, 3, iters=20, backend="dask")):
        _equal(a, b)
