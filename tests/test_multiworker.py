"""`fit` under MultiWorkerMirroredStrategy: two worker processes on loopback."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import _mwms_worker as worker
import numpy as np
import pytest

TESTS = pathlib.Path(__file__).parent
TIMEOUT = 300


def free_ports(count):
    # Hold every socket until all are bound, so the ports are distinct.
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_workers(tmp_path, optimizer, input_kind):
    """Both workers' results; fails with their stderr if either fails."""
    run_cluster(tmp_path, lambda index: [
        str(TESTS / "_mwms_worker.py"), optimizer, input_kind,
        str(tmp_path / f"worker{index}.npz"),
    ])
    return [
        dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(2)
    ]


def run_cluster(tmp_path, arguments):
    """Runs `python *arguments(index)` as workers 0 and 1 of one cluster;
    fails with their stderr if either fails."""
    procs = start_cluster(tmp_path, arguments)
    deadline = time.monotonic() + TIMEOUT
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        pass
    finally:
        # A worker whose peer died waits in a collective: end both.
        stop(procs)
    if any(proc.returncode != 0 for proc in procs):
        pytest.fail("\n".join(
            f"worker {i} exit {proc.returncode}:\n"
            f"{(tmp_path / f'worker{i}.err').read_text()[-3000:]}"
            for i, proc in enumerate(procs)
        ))


def start_cluster(tmp_path, arguments):
    """Starts the two workers; their output goes to tmp_path/worker{i}.out
    and .err (files: a full pipe would block a worker mid-collective)."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    python_path = [str(TESTS.parent), os.environ.get("PYTHONPATH", "")]
    procs = []
    for index in range(2):
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
            KERAS_BACKEND="tensorflow",
            TF_CPP_MIN_LOG_LEVEL="3",
            PYTHONPATH=os.pathsep.join(filter(None, python_path)),
        )
        with (tmp_path / f"worker{index}.out").open("w") as out, \
                (tmp_path / f"worker{index}.err").open("w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, *arguments(index)], cwd=TESTS.parent,
                env=env, stdout=out, stderr=err,
            ))
    return procs


def stop(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def single_process(optimizer):
    """Ordinary mean-loss steps on the same global batches, in order."""
    model = worker.build(optimizer)
    x, y = worker.data()
    history = model.fit(
        x, y, batch_size=worker.GLOBAL_BATCH, epochs=worker.EPOCHS,
        validation_data=(x, y), shuffle=False, verbose=0,
    )
    return worker.results(model, history)


def assert_same_keys_and_values(first, second, **tolerance):
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_allclose(
            first[key], second[key], err_msg=key, **tolerance
        )


# Two ways into `fit`: an input function reading its own shard per worker,
# and a plain dataset that `fit` distributes.
@pytest.mark.parametrize(
    "optimizer, input_kind", [("sgd", "function"), ("adamw", "dataset")]
)
def test_two_workers_match_each_other_and_one_process(
    tmp_path, optimizer, input_kind
):
    first, second = run_workers(tmp_path, optimizer, input_kind)
    # Replicated variables and all-reduced logs: bit for bit the same.
    assert_same_keys_and_values(first, second, rtol=0, atol=0)
    assert {"history:loss", "history:accuracy", "history:val_loss",
            "history:val_accuracy"} <= first.keys()
    assert len(first["history:loss"]) == worker.EPOCHS
    # Summation order differs from one process: float tolerance.
    assert_same_keys_and_values(
        first, single_process(optimizer), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("optimizer", ["sophia-h", "sophia-g"])
def test_sophia_workers_match_each_other_and_one_process(tmp_path, optimizer,
                                                         monkeypatch):
    first, second = run_workers(tmp_path, optimizer, "function")
    for kind in ("momentum", "hessian"):
        assert any(kind in key for key in first), kind
    assert_same_keys_and_values(first, second, rtol=0, atol=0)
    # Same fixed draws in this process. m and h agree to ~1e-8; an
    # unclipped coordinate moves lr * m / (rho * h), which amplifies that
    # in the weights (see test_distributed.py), hence atol 1e-5.
    monkeypatch.setattr(worker.keras_sophia.EstimatorContext, "uniform",
                        lambda self, shape, per_example=False:
                        worker.tf.fill(shape, 0.25))
    assert_same_keys_and_values(
        first, single_process(optimizer), rtol=1e-5, atol=1e-5
    )


def pretrain_command(out, cache):
    return lambda index: [
        "-m", "train.pretrain", "--strategy", "multiworker",
        "--model", "tiny", "--steps", "8", "--eval-interval", "4",
        "--log-interval", "4", "--batch-size", "4", "--block-size", "32",
        "--eval-steps", "2", "--hessian-interval", "2", "--out", str(out),
        "--cache-dir", str(cache),
    ]


def test_pretraining_program_on_two_workers(tmp_path):
    # The README's multi-worker command, on one tiny run: both workers
    # train, only the chief writes the run directory.
    out = tmp_path / "run"
    run_cluster(tmp_path, pretrain_command(out, tmp_path / "cache"))
    assert (out / "final.weights.h5").exists()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())[
        "step"] == 8
    steps = [json.loads(line)["step"]
             for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 4, 8, 8]  # a train line and a val_loss line each


@pytest.mark.large  # four worker processes
def test_killed_worker_then_both_restarted_resume(tmp_path):
    # Worker 1 is killed once the step-4 checkpoint exists; its peer is
    # stopped too (it would wait in a collective until the health check
    # ends it). The same commands again: both resume from step 4.
    out, cache = tmp_path / "run", tmp_path / "cache"
    procs = start_cluster(tmp_path, pretrain_command(out, cache))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "checkpoints" / "latest.json").exists():
            assert all(p.poll() is None for p in procs), "a worker ended"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
    finally:
        stop(procs)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())[
        "step"] == 4
    run_cluster(tmp_path, pretrain_command(out, cache))
    for index in range(2):
        printed = (tmp_path / f"worker{index}.out").read_text()
        assert "up to step 4: resuming" in printed, index
    assert json.loads((out / "checkpoints" / "latest.json").read_text())[
        "step"] == 8
    assert (out / "final.weights.h5").exists()
