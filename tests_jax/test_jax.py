"""What only Keras's JAX backend has: TensorFlow left out of the import,
non-finite steps, two devices against one under DataParallel, the
refusals, mixed bfloat16, a byte-level GPT-2 trained with each estimator,
the programs' behaviour on JAX and the benchmark's JAX part.

The estimator, train-step, golden-step and pretraining tests are in
tests/ and run on JAX too (`.ci/run`)."""

import json
import os
import subprocess
import sys

import jax
import keras
import numpy as np
import pytest
from conftest import AUSTEN
from conftest import CE
from conftest import check_backend_steps
from conftest import byte_windows
from conftest import classification_data
from conftest import slot_values
from conftest import tiny_classifier
from conftest import without_tensorflow

from keras_sophia import Sophia


def test_importing_keras_sophia_on_jax_leaves_tensorflow_out():
    code = ("import sys, keras_sophia; "
            "print('tensorflow' in sys.modules, keras_sophia.SophiaTrainStep"
            ".__module__)")
    out = subprocess.run([sys.executable, "-c", code], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "KERAS_BACKEND": "jax"}).stdout
    assert out.split() == ["False", "keras_sophia.jax_step"]


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_two_devices_match_one_on_the_same_global_batch(estimator):
    assert len(jax.devices()) == 2
    x, y = classification_data(n=32)
    runs = []
    for devices in ([jax.devices()[0]], jax.devices()):
        keras.utils.set_random_seed(0)
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices))
        model = tiny_classifier()
        model.compile(Sophia(0.05, hessian_update_interval=2, seed=1,
                             estimator=estimator), CE)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        runs.append((model.get_weights(),
                     slot_values(model.optimizer, "hessian")))
    (weights_1, h_1), (weights_2, h_2) = runs
    assert all(np.any(h != 0) for h in h_1)  # refreshed at steps 0 and 2
    # The GNB statistic is the global batch's gradient, squared once: a
    # per-device square would differ here by far more than rounding.
    for a, b in zip(h_1 + weights_1, h_2 + weights_2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("optimizer, named", [
    (lambda: keras.optimizers.LossScaleOptimizer(Sophia()), "Loss scaling"),
    (lambda: Sophia(gradient_accumulation_steps=2),
     "gradient_accumulation_steps=2"),
])
def test_what_jax_cannot_do_yet_is_refused_by_name(optimizer, named):
    x, y = classification_data(n=8)
    model = tiny_classifier()
    model.compile(optimizer(), CE)
    with pytest.raises(ValueError, match="not supported on the JAX") as error:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert named in str(error.value)


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_byte_level_gpt2_trains_with_falling_validation_loss(estimator):
    from models import gpt2

    block = 32
    train = byte_windows(8 * 60, block)
    # From the middle of the corpus, far from the training windows.
    val = byte_windows(64, block, start=os.path.getsize(AUSTEN) // 2)
    model = gpt2.build("byte-s", block_size=block, vocabulary_size=256)
    model.compile(Sophia(2e-3, rho=0.05, hessian_update_interval=5,
                         seed=0, estimator=estimator), CE)
    before = model.evaluate(*val, batch_size=32, verbose=0,
                            return_dict=True)["loss"]
    history = model.fit(*train, batch_size=8, epochs=3, verbose=0,
                        validation_data=val, shuffle=False)
    losses = history.history["val_loss"]
    print(f"{estimator}: validation losses {np.round(losses, 2)}")
    # From ln(256) = 5.5 to about 3.2 after the first pass over 60 batches,
    # lower at the end (measured over three: GNB 3.28, 3.24, 3.22;
    # Hutchinson 3.24, 3.22, 3.22).
    assert losses[-1] < losses[0] < before - 1.5
    assert losses[-1] < 3.4
    assert history.history["hessian_norm"][-1] > 0


@pytest.mark.parametrize("program", ["train.compare", "train.ablate"])
def test_the_tensorflow_programs_exit_2_with_one_line_on_jax(program):
    root = os.path.join(os.path.dirname(__file__), "..")
    done = subprocess.run(
        [sys.executable, "-m", program, "--quick"], cwd=root,
        capture_output=True, text=True,
        env={**os.environ, "KERAS_BACKEND": "jax"})
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith(
        f"{program} runs on Keras's TensorFlow backend only; KERAS_BACKEND "
        "is 'jax'.")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("flags, error", [
    (["--strategy", "tpu"], "--strategy must be one of default, mirrored "
     "on Keras's JAX backend; got 'tpu'"),
    (["--precision", "mixed_float16"], "--precision must be one of "
     "float32, mixed_bfloat16 on Keras's JAX backend; got 'mixed_float16'"),
    (["--deterministic"], "--deterministic is TensorFlow's on Keras's JAX "
     "backend"),
])
def test_pretraining_settings_jax_lacks_exit_2_naming_them(
    tmp_path, capsys, flags, error
):
    from train import pretrain

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        pretrain.main(flags + ["--out", str(out)])
    assert exit.value.code == 2
    message = capsys.readouterr().err.splitlines()[-1]
    assert message.startswith("python -m train.pretrain: error: " + error)
    assert not out.exists()


def test_the_benchmark_times_and_sizes_sophia_against_adamw_on_jax(
        tmp_path):
    # On Keras's JAX backend, TensorFlow not importable: the benchmark
    # times the steps and reads their compiled peak memory there.
    out = tmp_path / "bench.json"
    done = without_tensorflow("train.benchmark",
                              ["--quick", "--out", str(out)], "jax")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    times = check_backend_steps(result, "jax")
    # The peak device bytes of each compiled step (XLA's buffers), over
    # AdamW's for Sophia-G and Sophia-H on the whole and half the batch,
    # at the first size and where parameters dominate, each over AdamW's
    # at its own size.
    peaks = result["peak_memory_bytes"]
    assert peaks["adamw_jax"] > 0 and peaks["adamw_jax_parameters"] > 0
    ratios = result["peak_memory_ratio_vs_adamw"]
    variants = ("sophia_g", "sophia_g_half_batch", "sophia_h",
                "sophia_h_half_batch")
    assert set(ratios) == {f"{v}_jax{size}" for v in variants
                           for size in ("", "_parameters")}
    for cell, ratio in ratios.items():
        assert np.isfinite(ratio) and ratio > 0
        adamw = "adamw_jax" + ("_parameters" if "parameters" in cell else "")
        assert ratio == pytest.approx(peaks[cell] / peaks[adamw])
    assert result["settings"]["parts"] == ["jax"]
    assert result["machine"]["backend"] == "jax"
    assert set(result["jax_tokens_per_second"]) == set(times)
    table = (tmp_path / "bench.md").read_text()
    assert "Keras on JAX" in table
    assert "peak device memory, sophia_h_half_batch_jax" in table
