"""The training program end to end: files, falling loss, exact resume
after kill -9.

Backend-neutral: `.ci/run` runs this file on TensorFlow and on JAX (the
runs here and their child processes take the backend of KERAS_BACKEND)."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest

from train import configs
from train import pretrain

TINY = [
    "--steps", "24", "--eval-interval", "12", "--log-interval", "4",
    "--batch-size", "4", "--block-size", "32", "--eval-steps", "2",
    "--lr", "3e-3", "--warmup", "2", "--hessian-interval", "5",
]
# Without it, two uninterrupted TensorFlow runs already differ in the last
# bits (multithreaded CPU sums), and Sophia amplifies that where the
# curvature is tiny (measured: every attention key bias and a few other
# entries by up to 2e-4 after 12 Sophia-H steps). JAX's compiled CPU steps
# repeat their bits without it, and refuse it.
DETERMINISTIC = (["--deterministic"]
                 if keras.backend.backend() == "tensorflow" else [])


def read_weights(path):
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, item: arrays.__setitem__(name, item[()])
            if isinstance(item, h5py.Dataset) else None
        )
    return arrays


@pytest.fixture
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_run_writes_everything_and_loss_falls(tmp_path, cache, capsys):
    out = tmp_path / "run"
    val_loss = pretrain.main(TINY + ["--out", str(out), "--cache-dir", cache])
    assert np.isfinite(val_loss)
    # Not a terminal (captured): one plain line per eval interval, no
    # progress bar redrawn with carriage returns and colour codes.
    shown = [x for x in capsys.readouterr().out.splitlines()
             if "win_rate" in x]
    assert len(shown) == 2 and all(" - val_loss: " in x for x in shown)
    assert not any("\r" in x or "\x1b" in x for x in shown)
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == "sophia-g" and config["steps"] == 24
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    train = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train] == [4, 8, 12, 16, 20, 24]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all({"lr", "win_rate", "hessian_norm", "grad_norm"} <= set(x)
               for x in train)
    assert all(0.0 <= x["clipped"] <= 1.0 for x in train[1:])
    assert [x["step"] for x in lines if "val_loss" in x] == [12, 24]
    times = [x["time"] for x in lines]  # seconds in training steps
    assert 0 < times[0] and times == sorted(times)
    assert (out / "final.weights.h5").stat().st_size > 0
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads(
        (out / "checkpoints" / "latest.json").read_text()
    )["step"] == 24


def test_same_command_continues_another_is_refused(tmp_path, cache):
    out = str(tmp_path / "run")
    args = TINY + ["--steps", "12", "--out", out, "--cache-dir", cache]
    pretrain.main(args)
    with pytest.raises(SystemExit, match=r"other settings: lr \(0\.003 there, "
                       r"0\.001 here\)\. Pass --resume"):
        pretrain.main(args + ["--lr", "1e-3"])
    # Another backend draws other numbers for the same seed: its run is
    # another run too.
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    assert saved["keras_backend"] == keras.backend.backend()
    path.write_text(json.dumps(dict(saved, keras_backend="elsewhere")))
    with pytest.raises(SystemExit, match=(
            r"other settings: keras_backend \('elsewhere' there, "
            f"'{keras.backend.backend()}' here")):
        pretrain.main(args)
    path.write_text(json.dumps(saved))
    # The same command finds the run complete at step 12: nothing to train.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    pretrain.main(args)
    assert (tmp_path / "run" / "metrics.jsonl").read_text().startswith(lines)


def test_steps_need_not_be_a_multiple_of_the_eval_interval(
    tmp_path, cache, capsys, recwarn
):
    # 18 = 12 + 6: the last interval is short, and still validated and
    # checkpointed.
    out = tmp_path / "run"
    pretrain.main(TINY + ["--steps", "18", "--out", str(out),
                          "--cache-dir", cache])
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in lines if "loss" in x] == [4, 8, 12, 16]
    assert [x["step"] for x in lines if "val_loss" in x] == [12, 18]
    assert lines[-1]["step"] == 18
    folder = out / "checkpoints"
    # latest.json's step is optimizer.iterations when it was saved.
    assert json.loads((folder / "latest.json").read_text())["step"] == 18
    assert sorted(x.name for x in folder.glob("ckpt-*")) == [
        "ckpt-00000012.weights.h5", "ckpt-00000018.weights.h5"]
    # The bar shows the loss, lr and win rate, over the 6 steps of the
    # last interval; the diagnostics are in metrics.jsonl only.
    shown = capsys.readouterr().out
    assert "Epoch 2/2" in shown and "6/6" in shown
    assert "win_rate:" in shown and "lr:" in shown
    assert "hessian_norm" not in shown and "grad_norm" not in shown
    assert all({"hessian_norm", "grad_norm"} <= set(x)
               for x in lines if "loss" in x)
    assert not [w for w in recwarn if "shuffle" in str(w.message)]


def test_a_resume_into_a_short_last_interval_ends_where_a_straight_run_ends(
    tmp_path, cache
):
    # Processes, for --deterministic (see the kill -9 test below): it must
    # take effect before TensorFlow's first op.
    args = TINY + ["--steps", "18", "--cache-dir", cache, *DETERMINISTIC]
    root = pathlib.Path(__file__).parents[1]

    def run(out):
        done = subprocess.run(
            [sys.executable, "-m", "train.pretrain", *args, "--out",
             str(out)], cwd=root, capture_output=True, text=True,
            timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.splitlines()

    straight = tmp_path / "straight"
    val_loss = run(straight)[-1]
    # The straight run keeps its checkpoints at 12 and 18. A copy whose
    # latest.json names the one at 12 is that run killed after it: the
    # same command resumes at 12 and trains the short interval to 18.
    out = tmp_path / "resumed"
    shutil.copytree(straight, out)
    (out / "final.weights.h5").unlink()
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(saved, out=str(out))))
    (out / "checkpoints" / "latest.json").write_text(json.dumps(
        {"step": 12, "file": "ckpt-00000012.weights.h5"}))
    lines = run(out)
    assert "up to step 12: resuming" in "\n".join(lines)
    assert lines[-1] == val_loss
    assert pretrain.latest_checkpoint(out)[0] == 18
    a = read_weights(straight / "final.weights.h5")
    b = read_weights(out / "final.weights.h5")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


@pytest.mark.large  # ~70 s each: four processes
@pytest.mark.parametrize("optimizer", ["sophia-g", "sophia-h"])
def test_kill_9_then_the_same_command_ends_where_a_straight_run_ends(
    tmp_path, cache, optimizer
):
    args = TINY + ["--steps", "12", "--eval-interval", "4", "--optimizer",
                   optimizer, "--cache-dir", cache, *DETERMINISTIC]
    root = pathlib.Path(__file__).parents[1]

    def command(out):
        return [sys.executable, "-m", "train.pretrain", *args,
                "--out", str(out)]

    straight = subprocess.run(command(tmp_path / "straight"), cwd=root,
                              capture_output=True, text=True, timeout=600,
                              check=False)
    assert straight.returncode == 0, straight.stderr[-3000:]
    val_loss = straight.stdout.splitlines()[-1]
    assert val_loss.startswith("final validation loss: ")

    # The same run in a process killed without warning once its first
    # checkpoint (step 4) is on disk, somewhere before step 12 ...
    out = tmp_path / "killed"
    run = subprocess.Popen(command(out), cwd=root, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while pretrain.latest_checkpoint(out) is None:
            assert run.poll() is None, "the run ended before its checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    killed_at = pretrain.latest_checkpoint(out)[0]
    assert killed_at < 12
    # ... as if the kill had also hit a save: half-written files lie there.
    folder = out / "checkpoints"
    (folder / "partial-ckpt-00000030.weights.h5").write_bytes(b"\0" * 100)
    (folder / "latest.json.partial").write_text('{"step": 30, "fi')

    done = subprocess.run(command(out), cwd=root, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"up to step {killed_at}: resuming" in done.stdout
    assert done.stdout.splitlines()[-1] == val_loss
    # The clock went on from the checkpoint's time: the last line logged
    # for each step has a time that grows with the step.
    lines = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    last = {x["step"]: x["time"] for x in lines if "val_loss" in x}
    assert list(last.values()) == sorted(last.values())
    # Bit for bit: m, h, iterations, the k-step schedule, the data position
    # and the estimator's random stream all came back.
    a = read_weights(tmp_path / "straight" / "final.weights.h5")
    b = read_weights(out / "final.weights.h5")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def test_named_configs_cover_every_size_and_optimizer():
    for size in ("small", "medium", "large"):
        for opt in ("sophia-g", "sophia-h", "adamw", "lion"):
            config = pretrain.Config(**configs.CONFIGS[f"gpt2-{size}-{opt}"])
            assert config.block_size == 1024 and config.batch_size == 480
    small = configs.CONFIGS["gpt2-small-sophia-g"]
    assert (small["lr"], small["rho"], small["model"]) == (6e-4, 0.05, "125m")


def test_mirrored_strategy_on_two_cpu_devices(tmp_path, cache):
    # Two CPU devices must exist before the backend starts: a subprocess.
    # TensorFlow: two logical CPUs; JAX: two host devices (DataParallel);
    # torch, where Keras offers no distribution: refused in one line.
    # `train` first: on torch it loads triton before TensorFlow.
    script = (
        "import train\n"
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(\n"
        "    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from train import pretrain\n"
        "import sys\n"
        "pretrain.main(sys.argv[1:])\n"
    )
    args = TINY + ["--strategy", "mirrored", "--steps", "12",
                   "--out", str(tmp_path / "run"), "--cache-dir", cache]
    env = dict(os.environ, XLA_FLAGS=(
        os.environ.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=2"))
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True,
        text=True, cwd=pathlib.Path(__file__).parents[1], timeout=600,
        env=env,
    )
    if keras.backend.backend() == "torch":
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.strip().splitlines()[-1] == (
            "python -m train.pretrain: error: --strategy must be one of "
            "default on Keras's "
            "torch backend; got 'mirrored'")
        return
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 replica(s)" in done.stdout
    assert "final validation loss" in done.stdout
    assert (tmp_path / "run" / "final.weights.h5").exists()


def test_validation_loss_is_the_mean_loss_of_the_validation_batches(
    tmp_path, cache
):
    # Evaluated at steps 2 and 4 and after the run, each time over the
    # same 2 batches; recomputed here from the final weights, op by op.
    from models import gpt2
    from train import data

    out = tmp_path / "run"
    val_loss = pretrain.main(TINY + ["--steps", "4", "--eval-interval", "2",
                                     "--out", str(out), "--cache-dir", cache])
    _, val_ids = data.load_tokens("austen", cache, val_fraction=0.05)
    batches = data.make_dataset(val_ids, 32, 4).take(2).as_numpy_iterator()
    model = gpt2.build("tiny", block_size=32)
    # The file holds Sophia's state too; this model's optimizer is
    # keras-hub's default, so Keras loads the weights alone, and says so.
    with pytest.warns(UserWarning, match="Skipping variable loading"):
        model.load_weights(out / "final.weights.h5")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # convert_to_numpy: on torch a loss of weights that require grad is
    # detached first (float() of it warns).
    by_hand = np.mean([float(keras.ops.convert_to_numpy(loss(y, model(x))))
                       for x, y in batches])
    logged = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in logged if "val_loss" in x] == [2, 4]
    np.testing.assert_allclose(val_loss, by_hand, rtol=1e-5)
    np.testing.assert_allclose(logged[-1]["val_loss"], by_hand, rtol=1e-5)
