"""Test helpers that run on either Keras backend (TensorFlow, JAX):
`tests/conftest.py` and `tests_jax/conftest.py` both take them from here."""

import keras
import numpy as np

import keras_sophia
from keras_sophia import Sophia


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
