"""Sophia on Keras's JAX backend: estimators against closed forms, the
refresh inside `fit`, save and continue, two devices against one, a
byte-level GPT-2 trained with each estimator."""

import json
import os
import subprocess
import sys

import jax
import keras
import numpy as np
import pytest
from conftest import SophiaModel
from conftest import classification_data
from conftest import least_squares
from conftest import slot_values
from conftest import tiny_classifier

from keras_sophia import Hutchinson
from keras_sophia import Sophia
from keras_sophia import estimate_hessian

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_importing_keras_sophia_on_jax_leaves_tensorflow_out():
    code = ("import sys, keras_sophia; "
            "print('tensorflow' in sys.modules, keras_sophia.SophiaTrainStep"
            ".__module__)")
    out = subprocess.run([sys.executable, "-c", code], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "KERAS_BACKEND": "jax"}).stdout
    assert out.split() == ["False", "keras_sophia.jax_step"]


def mean_estimate(model, x, y, estimator, draws):
    """Average of `draws` estimates, each from its own seed."""
    one = jax.jit(lambda seed: estimate_hessian(model, x, y, None,
                                                estimator, seed))
    total = None
    for i in range(draws):
        est = [np.asarray(e) for e in one(i)]
        total = est if total is None else [t + e for t, e in zip(total, est)]
    return [t / draws for t in total]


def test_hutchinson_mean_approaches_least_squares_hessian_diagonal():
    model, x, y = least_squares()
    # L = mean_n (x_n . w + b - y_n)^2, so H = (2 / n) [x 1]^T [x 1]:
    # diag = (2 / n) sum_n x_ni^2 for the kernel and 2 for the bias.
    kernel_diag = 2.0 * np.mean(x**2, axis=0)[:, None]
    kernel, bias = mean_estimate(model, x, y, Hutchinson(), draws=1500)
    np.testing.assert_allclose(kernel, kernel_diag, rtol=0.1)
    np.testing.assert_allclose(bias, [2.0], rtol=0.1)


def test_hutchinson_is_exact_when_the_hessian_is_diagonal():
    # Orthogonal feature columns make H diagonal, and u * (D u) = D for any
    # +-1 probe: one estimate is exact.
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 3)))
    x = (q * [3.0, 1.0, 0.1]).astype("float32")
    inputs = keras.Input((3,))
    model = SophiaModel(inputs,
                        keras.layers.Dense(1, use_bias=False)(inputs))
    model.compile(Sophia(seed=0), loss="mse")
    (kernel,) = estimate_hessian(model, x, np.zeros((8, 1), "float32"),
                                 estimator="hutchinson", seed=3)
    np.testing.assert_allclose(np.asarray(kernel)[:, 0],
                               2.0 / 8 * np.array([9.0, 1.0, 0.01]),
                               rtol=1e-5)


def test_gnb_mean_approaches_the_fisher_diagonal():
    rng = np.random.default_rng(0)
    n, d, classes = 16, 3, 4
    x = rng.normal(size=(n, d)).astype("float32")
    inputs = keras.Input((d,))
    dense = keras.layers.Dense(
        classes, use_bias=False,
        kernel_initializer=keras.initializers.RandomNormal(stddev=1.0,
                                                           seed=1))
    model = SophiaModel(inputs, dense(inputs))
    model.compile(Sophia(seed=0), loss=CE)
    logits = x @ np.asarray(dense.kernel.value)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    # Fisher (= Gauss-Newton for softmax CE) diagonal of the mean loss, for
    # kernel entry (i, c): mean_n x_ni^2 p_nc (1 - p_nc). The labels (each
    # row's least likely class) do not enter it.
    fisher = np.einsum("ni,nc->ic", x**2, p * (1 - p)) / n
    (kernel,) = mean_estimate(model, x, np.argmin(p, -1), "gnb", draws=2000)
    np.testing.assert_allclose(kernel, fisher, rtol=0.12, atol=1e-4)


class HessianChanges(keras.callbacks.Callback):
    """Per step (an epoch of one batch, after which Keras's JAX trainer
    writes its state back to the variables): whether h changed."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer, self.changed, self.before = optimizer, [], None

    def on_epoch_end(self, epoch, logs=None):
        now = slot_values(self.optimizer, "hessian")
        before = self.before or [np.zeros_like(h) for h in now]
        self.changed.append(any(not np.array_equal(a, b)
                                for a, b in zip(now, before)))
        self.before = now


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_fit_refreshes_h_when_iterations_is_a_multiple_of_k(estimator):
    x, y = classification_data(n=8)
    model = tiny_classifier()
    model.compile(Sophia(1e-2, hessian_update_interval=3, seed=0,
                         estimator=estimator), CE)
    record = HessianChanges(model.optimizer)
    model.fit(x, y, batch_size=8, epochs=7, verbose=0, callbacks=[record])
    assert record.changed == [t % 3 == 0 for t in range(7)]
    assert int(model.optimizer.iterations.value) == 7


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_refresh_step_is_estimate_then_update_then_ordinary_step(estimator):
    x, y = classification_data(n=8)
    trained = tiny_classifier()
    by_hand = tiny_classifier()
    by_hand.set_weights(trained.get_weights())
    for model in (trained, by_hand):
        model.compile(Sophia(0.1, seed=4, estimator=estimator), CE)
    trained.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)

    # Step 0 by hand: estimate at the current weights on the batch (the
    # step's draws come from (seed, iterations = 0), as estimate_hessian's
    # with seed=4), update h, then the plain update.
    variables = by_hand.trainable_variables
    estimates = estimate_hessian(by_hand, x, y, seed=4)
    by_hand.optimizer.update_hessian(estimates, variables)
    values = [v.value for v in variables]

    def loss(values):
        y_pred = by_hand.stateless_call(values, [], x, training=True)[0]
        return CE(y, y_pred)

    by_hand.optimizer.apply(jax.grad(loss)(values), variables)

    for kind in ("hessian", "momentum"):
        for a, b in zip(slot_values(trained.optimizer, kind),
                        slot_values(by_hand.optimizer, kind)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    for a, b in zip(trained.get_weights(), by_hand.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_non_finite_gradient_skips_the_step_and_leaves_h_alone():
    x, y = classification_data(n=8)
    x[0, 0] = np.nan
    model = tiny_classifier()
    model.compile(Sophia(0.1, seed=0), CE)
    weights = model.get_weights()
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    for h in slot_values(model.optimizer, "hessian"):
        np.testing.assert_array_equal(h, 0.0)
    assert history.history["skipped_steps"] == [1]
    assert history.history["skipped_refreshes"] == [1]
    assert int(model.optimizer.iterations.value) == 0


def test_saved_model_continues_exactly(tmp_path):
    x, y = classification_data(n=48)

    def fresh():
        keras.utils.set_random_seed(0)
        model = tiny_classifier()
        model.compile(Sophia(0.05, hessian_update_interval=2, seed=3), CE)
        return model

    straight = fresh()
    straight.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    first = fresh()
    first.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    first.save(tmp_path / "m.keras")
    resumed = keras.models.load_model(tmp_path / "m.keras")
    resumed.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(a, b)
    for kind in ("hessian", "momentum"):
        for a, b in zip(slot_values(resumed.optimizer, kind),
                        slot_values(straight.optimizer, kind)):
            np.testing.assert_array_equal(a, b)


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


@pytest.mark.parametrize("fraction", [0.5])
def test_hessian_batch_fraction_estimates_on_the_leading_examples(fraction):
    x, y = classification_data(n=8)
    sliced = tiny_classifier()
    whole = tiny_classifier()
    whole.set_weights(sliced.get_weights())
    sliced.compile(Sophia(0.1, seed=4, hessian_batch_fraction=fraction), CE)
    whole.compile(Sophia(0.1, seed=4), CE)
    estimates = estimate_hessian(whole, x[:4], y[:4], seed=4)
    sliced.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    # Step 0 from h = 0: h = (1 - beta_2) * estimate on the first 4.
    for h, e in zip(slot_values(sliced.optimizer, "hessian"), estimates):
        np.testing.assert_allclose(h, 0.01 * np.asarray(e), rtol=1e-5,
                                   atol=1e-9)


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


def byte_windows(text, block, count, start):
    """`count` (inputs, next-byte labels) windows of `block` UTF-8 bytes."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8).astype("int32")
    starts = start + block * np.arange(count)
    tokens = np.stack([data[s:s + block + 1] for s in starts])
    x = {"token_ids": tokens[:, :-1],
         "padding_mask": np.ones((count, block), "int32")}
    return x, tokens[:, 1:]


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_byte_level_gpt2_trains_with_falling_validation_loss(estimator):
    from models import gpt2

    path = os.path.join(os.path.dirname(__file__), "..", "train", "data",
                        "austen.txt")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    block = 32
    train = byte_windows(text, block, 8 * 60, start=0)
    val = byte_windows(text, block, 64, start=len(text) // 2)
    model = gpt2.build("byte-s", block_size=block, vocabulary_size=256)
    model.compile(Sophia(2e-3, rho=0.05, hessian_update_interval=5,
                         seed=0, estimator=estimator), CE)
    before = model.evaluate(*val, batch_size=32, verbose=0,
                            return_dict=True)["loss"]
    history = model.fit(*train, batch_size=8, epochs=3, verbose=0,
                        validation_data=val, shuffle=False)
    losses = history.history["val_loss"]
    # From ln(256) = 5.5 to about 3.2 after the first pass over 60 batches
    # (GNB 3.24, 3.25, 3.18 over three; Hutchinson 3.29, 3.25, 3.24), lower at the end.
    assert losses[-1] < losses[0] < before - 1.5
    assert losses[-1] < 3.4
    assert history.history["hessian_norm"][-1] > 0


def test_the_tensorflow_programs_exit_2_with_one_line_on_jax():
    root = os.path.join(os.path.dirname(__file__), "..")
    done = subprocess.run(
        [sys.executable, "-m", "train.pretrain", "--steps", "1"], cwd=root,
        capture_output=True, text=True,
        env={**os.environ, "KERAS_BACKEND": "jax"})
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines()
             if "TensorFlow backend only" in line]
    assert len(lines) == 1 and "KERAS_BACKEND is 'jax'" in lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_mixed_bfloat16_keeps_float32_state_and_trains(estimator):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        x, y = classification_data(n=64)
        model = tiny_classifier()
        model.compile(Sophia(1e-2, hessian_update_interval=2, seed=0,
                             estimator=estimator), CE)
        losses = model.fit(x, y, batch_size=16, epochs=3,
                           verbose=0).history["loss"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # The model computes in bfloat16 (its output, and so GNB's cotangent,
    # too); the weights, m and h stay float32, and h was refreshed.
    assert all(w.dtype == np.float32 for w in model.get_weights())
    for kind in ("hessian", "momentum"):
        slots = slot_values(model.optimizer, kind)
        assert all(s.dtype == np.float32 for s in slots)
        assert all(np.any(s != 0) for s in slots)
    assert losses[2] < losses[1] < losses[0]


def test_the_benchmark_times_sophia_against_adamw_on_jax(tmp_path):
    # train.benchmark is a TensorFlow program; its `jax` part times the
    # steps in a child process of its own on JAX.
    root = os.path.join(os.path.dirname(__file__), "..")
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "train.benchmark", "--quick", "--parts",
         "jax", "--out", str(out)], cwd=root, check=True,
        capture_output=True, env={**os.environ,
                                  "KERAS_BACKEND": "tensorflow"})
    result = json.loads(out.read_text())
    ratios = result["jax_step_time_ratio_vs_adamw"]
    assert set(ratios) == {"sophia_g", "sophia_h"}
    assert all(0 < r < 10 for r in ratios.values())
    times = result["seconds"]["jax_train_step"]["sophia_h"]
    # A Hutchinson refresh step is dearer than an ordinary one.
    assert times["refresh_step"] > times["ordinary_step"]
    assert "Keras on JAX" in (tmp_path / "bench.md").read_text()
