"""Setup of the JAX-backend tests: Keras on JAX, two host devices.

They run in their own pytest process (`python -m pytest tests_jax`), as
the backend is chosen once per process and `tests/` runs TensorFlow.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
# Two CPU devices for the data-parallel tests; set before JAX starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_sophia  # noqa: E402


@keras.saving.register_keras_serializable(package="keras_sophia_jax_tests")
class SophiaModel(keras_sophia.SophiaTrainStep, keras.Model):
    """A functional Keras model with the Hessian-refreshing train step."""


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    keras.distribution.set_distribution(None)
    yield


def slot_values(optimizer, kind):
    """Numpy copies of the `kind` ("momentum"/"hessian") slots, in order."""
    return [np.array(v.value) for v in optimizer.variables if kind in v.name]


def tiny_classifier(inputs=5, hidden=8, classes=3):
    x = keras.Input((inputs,))
    h = keras.layers.Dense(hidden, activation="tanh")(x)
    return SophiaModel(x, keras.layers.Dense(classes)(h))


def classification_data(n=64, inputs=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype("float32")
    return x, rng.integers(0, classes, size=(n,))
