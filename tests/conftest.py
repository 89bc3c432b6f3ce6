"""Shared test setup: quiet TensorFlow, the TF backend, small helpers."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Four logical CPUs for the MirroredStrategy tests. They must exist before
# TensorFlow starts its runtime, i.e. before any test runs; single-device
# tests keep using the first one.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 4,
)
CPUS = [f"/cpu:{i}" for i in range(4)]

import keras_sophia  # noqa: E402


@keras.saving.register_keras_serializable(package="keras_sophia_tests")
class SophiaModel(keras_sophia.SophiaTrainStep, keras.Model):
    """A functional Keras model with the Hessian-refreshing train step."""


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield


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


def tiny_gpt2(vocabulary_size, sequence_length, width=32, dtype=None):
    """An uncompiled `SophiaGPT2` of 2 layers and 2 heads, no dropout;
    `dtype=None` takes the global policy (keras-hub's task model takes its
    policy from the backbone)."""
    import keras_hub

    from models.gpt2 import SophiaGPT2

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size, num_layers=2, num_heads=2,
        hidden_dim=width, intermediate_dim=2 * width, dropout=0.0,
        max_sequence_length=sequence_length, dtype=dtype,
    )
    return SophiaGPT2(backbone=backbone, preprocessor=None)
