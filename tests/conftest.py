"""Shared test setup: quiet TensorFlow, the TF backend, small helpers."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
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

# The helpers the test files import from here (`from conftest import ...`).
from common import SophiaModel  # noqa: E402,F401
from common import classification_data  # noqa: E402,F401
from common import least_squares  # noqa: E402,F401
from common import slot_values  # noqa: E402,F401
from common import tiny_classifier  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield


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
