"""Shared test setup: quiet TensorFlow, the backend, small helpers.

The tests run on Keras's TensorFlow backend unless KERAS_BACKEND says
otherwise. `.ci/run` also runs the backend-neutral files under
`KERAS_BACKEND=jax` and `torch` (the list is in docs/tests.md); there the tests
marked `tensorflow` (TensorFlow-only features) are deselected.
"""

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
from common import CE  # noqa: E402,F401
from common import SophiaModel  # noqa: E402,F401
from common import byte_windows  # noqa: E402,F401
from common import classification_data  # noqa: E402,F401
from common import estimate_draws  # noqa: E402,F401
from common import gradients  # noqa: E402,F401
from common import least_squares  # noqa: E402,F401
from common import mirrored  # noqa: E402,F401
from common import replica_values  # noqa: E402,F401
from common import slot_values  # noqa: E402,F401
from common import state  # noqa: E402,F401
from common import tiny_classifier  # noqa: E402,F401
from common import train  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    """Under another backend than TensorFlow, leaves out the tests marked
    `tensorflow`."""
    if keras.backend.backend() == "tensorflow":
        return
    left_out = [item for item in items if item.get_closest_marker(
        "tensorflow")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]


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
