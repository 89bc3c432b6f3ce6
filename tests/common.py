"""Test helpers that run on either Keras backend (TensorFlow, JAX), and
the tf.distribute ones (TensorFlow only, imported when called):
`tests/conftest.py` and `tests_jax/conftest.py` both take them from here."""

import functools
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_sophia
from keras_sophia import Sophia
from keras_sophia import estimate_hessian

# The loss of every classifier and language model in the tests.
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

AUSTEN = os.path.join(os.path.dirname(__file__), os.pardir, "train", "data",
                      "austen.txt")


@keras.saving.register_keras_serializable(package="keras_sophia_tests")
class SophiaModel(keras_sophia.SophiaTrainStep, keras.Model):
    """A functional Keras model with the Hessian-refreshing train step."""


def slot_values(optimizer, kind):
    """Numpy copies of the `kind` ("momentum"/"hessian") slots, in order."""
    return [v.numpy() for v in optimizer.variables if kind in v.name]


def tiny_classifier(inputs=5, hidden=8, classes=3):
    x = keras.Input((inputs,))
    h = keras.layers.Dense(hidden, activation="tanh")(x)
    return SophiaModel(x, keras.layers.Dense(classes)(h))


def classification_data(n=64, inputs=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype("float32")
    return x, rng.integers(0, classes, size=(n,))


def least_squares(n=32, d=4, seed=0):
    """Linear regression with correlated features and a bias."""
    rng = np.random.default_rng(seed)
    mixing = np.eye(d) + 0.5 * rng.normal(size=(d, d))
    x = (rng.normal(size=(n, d)) @ mixing).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    inputs = keras.Input((d,))
    model = SophiaModel(inputs, keras.layers.Dense(1)(inputs))
    model.compile(Sophia(seed=0), loss="mse")
    return model, x, y


def estimate_draws(model, x, y, estimator, sample_weight=None):
    """`i -> the i-th of a series of independent estimates`, compiled once
    (tf.function or jax.jit; eager on torch) for the whole series."""
    if keras.backend.backend() == "torch":
        return lambda i: [keras.ops.convert_to_numpy(e) for e in
                          estimate_hessian(model, x, y, sample_weight,
                                           estimator, i)]
    if keras.backend.backend() == "jax":
        import jax

        one = jax.jit(lambda seed: estimate_hessian(
            model, x, y, sample_weight, estimator, seed))
        return lambda i: [np.asarray(e) for e in one(i)]
    import tensorflow as tf

    one = tf.function(lambda seed: estimate_hessian(
        model, x, y, sample_weight, estimator, seed))
    return lambda i: [e.numpy() for e in one(tf.constant([7, i], tf.int64))]


def gradients(model, loss, x, y):
    """The gradient of `loss(y, model(x, training=True))` with respect to
    `model.trainable_variables`, as arrays."""
    if keras.backend.backend() == "jax":
        import jax

        fixed = [v.value for v in model.non_trainable_variables]

        def value(values):
            y_pred, _ = model.stateless_call(values, fixed, x, training=True)
            return loss(y, y_pred)

        return jax.grad(value)([v.value for v in model.trainable_variables])
    if keras.backend.backend() == "torch":
        import torch

        value = loss(y, model(x, training=True))
        return torch.autograd.grad(
            value, [v.value for v in model.trainable_variables])
    import tensorflow as tf

    with tf.GradientTape() as tape:
        value = loss(y, model(x, training=True))
    return tape.gradient(value, model.trainable_variables)


def byte_windows(count, block, start=0):
    """`count` consecutive, disjoint windows of `block + 1` bytes of the
    embedded corpus from byte `start`, as (x, y) for a GPT-2 over the 256
    byte values (no tokenizer): x the first `block` bytes of each window,
    with a padding mask of ones, y the `block` bytes after the first."""
    with open(AUSTEN, "rb") as f:
        f.seek(start)
        raw = f.read(count * (block + 1))
    windows = np.frombuffer(raw, np.uint8).astype("int32")
    windows = windows.reshape(count, block + 1)
    x = {"token_ids": windows[:, :-1],
         "padding_mask": np.ones((count, block), "int32")}
    return x, windows[:, 1:]


@functools.cache
def mirrored(devices):
    """One strategy per device set for the whole process: a second
    MirroredStrategy would reuse the first one's collective keys (TF then
    aborts on a shape mismatch), and a group of another size on the same
    keys is refused too, so four devices reduce through one device."""
    import tensorflow as tf

    if len(devices) == 2:
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def replica_values(variable):
    """Numpy copy of each replica's component of a mirrored variable."""
    return [t.numpy() for t in variable.value.values]


def train(make_optimizer, devices=None, x=None, y=None, steps=4,
          batch_size=16):
    """Trains `tiny_classifier` from the same initial weights on `steps`
    global batches (or on `x, y` in order), on `devices` (None: one
    device, no strategy). Returns the model."""
    import tensorflow as tf

    if x is None:
        x, y = classification_data(n=batch_size * steps)
    strategy = mirrored(devices) if devices else tf.distribute.get_strategy()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = tiny_classifier()
        model.compile(make_optimizer(), CE)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False,
              verbose=0)
    return model


def state(model, leave_out=None):
    """Weights then optimizer variables (but those named with
    `leave_out`), one list of replica copies each."""
    return [
        replica_values(v) if hasattr(v.value, "values") else [v.numpy()]
        for v in model.trainable_variables + model.optimizer.variables
        if leave_out is None or leave_out not in v.name
    ]


def check_backend_steps(result, backend):
    """What `train.benchmark` must write of the train steps it timed on
    Keras's `backend`, not how fast anything ran (speed is what the
    benchmark reports, not what a test asserts); returns the times."""
    times = result["seconds"][f"{backend}_train_step"]
    assert set(times) == {"adamw", "sophia_g", "sophia_h",
                          "keras_step_sophia"}
    for run in times.values():
        # One per-step figure per timed k-step cycle; the ratios use the
        # median one.
        assert len(run["cycles"]) == result["settings"]["cycles"]
        measured = run["cycles"] + [run["refresh_step"], run["ordinary_step"]]
        assert all(np.isfinite(t) and t > 0 for t in measured)
        assert run["step"] == pytest.approx(np.median(run["cycles"]))
    ratios = result[f"{backend}_step_time_ratio_vs_adamw"]
    ordinary = result[f"{backend}_ordinary_step_ratio_vs_keras_step"]
    assert set(ratios) == set(ordinary) == {"sophia_g", "sophia_h"}
    for name in ratios:
        assert ratios[name] == pytest.approx(
            times[name]["step"] / times["adamw"]["step"])
        assert ordinary[name] == pytest.approx(
            times[name]["ordinary_step"]
            / times["keras_step_sophia"]["ordinary_step"])
    settings = result["settings"]
    tokens = settings["batch_size"] * settings["block_size"]
    assert result[f"{backend}_tokens_per_second"] == pytest.approx(
        {name: tokens / t["step"] for name, t in times.items()})
    return times


def without_tensorflow(program, args, backend):
    """Runs `python -m program *args` on Keras's `backend` from the
    repository root in a process where `import tensorflow` fails, as on a
    machine without it; returns the finished process."""
    hide = ("import runpy, sys; sys.modules['tensorflow'] = None; "
            f"sys.argv[0] = {program!r}; "
            f"runpy.run_module({program!r}, run_name='__main__', "
            "alter_sys=True)")
    return subprocess.run(
        [sys.executable, "-c", hide, *args], capture_output=True, text=True,
        cwd=os.path.join(os.path.dirname(__file__), os.pardir),
        env={**os.environ, "KERAS_BACKEND": backend})
