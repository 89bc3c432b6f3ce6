"""Test helpers that run on either Keras backend (TensorFlow, JAX):
`tests/conftest.py` and `tests_jax/conftest.py` both take them from here."""

import keras
import numpy as np

import keras_sophia
from keras_sophia import Sophia
from keras_sophia import estimate_hessian


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
    (tf.function or jax.jit) for the whole series."""
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
    import tensorflow as tf

    with tf.GradientTape() as tape:
        value = loss(y, model(x, training=True))
    return tape.gradient(value, model.trainable_variables)
