"""The private parts of Keras that keras_sophia relies on still behave as
`keras_sophia/keras_internals.py` assumes: one test per assumption, so a
new Keras release that breaks one fails here, by name."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_classifier

from keras_sophia import keras_internals


def test_a_missing_internal_is_named_with_the_keras_version():
    with pytest.raises(ImportError, match=(
            r"needs the thing \(`_gone`\), which Keras \d.*3\.11 to 3\.15")):
        keras_internals._require(keras.Model, "_gone", "the thing")


def test_the_loss_tracker_is_what_fit_logs_as_loss():
    model = tiny_classifier()
    model.compile("sgd", "sparse_categorical_crossentropy")
    keras_internals.track_loss(model, tf.constant(2.0), np.zeros((4, 5)))
    keras_internals.track_loss(model, tf.constant(5.0), np.zeros((2, 5)))
    # Weighted by batch size: (4 * 2 + 2 * 5) / 6.
    assert float(model.get_metrics_result()["loss"]) == pytest.approx(3.0)


def test_apply_all_reduces_through_the_hook_switched_off(monkeypatch):
    reduced = []
    monkeypatch.setattr(
        keras.optimizers.SGD, "_all_reduce_sum_gradients",
        lambda self, grads_and_vars: reduced.append(1) or list(
            grads_and_vars))
    variable = keras.Variable([1.0, 2.0])
    optimizer = keras.optimizers.SGD(0.5)
    with keras_internals.gradients_already_reduced(optimizer):
        optimizer.apply([tf.constant([1.0, 1.0])], [variable])
    assert reduced == []
    # Outside the context (a user's own `apply`) it reduces again.
    optimizer.apply([tf.constant([1.0, 1.0])], [variable])
    assert reduced == [1]
    np.testing.assert_allclose(variable.numpy(), [0.0, 1.0])


def test_fit_builds_through_the_methods_multiworkerfit_overrides():
    parameters = inspect.signature(keras.Model._maybe_symbolic_build)
    assert {"iterator", "data_batch"} <= set(parameters.parameters)
    model = tiny_classifier()
    model.compile("sgd", "sparse_categorical_crossentropy")
    made = []
    make = model._make_function
    model._make_function = lambda step: made.append(step) or make(step)
    model.fit(np.zeros((4, 5)), np.zeros(4), verbose=0)
    # Keras's own `make_train_function` is `_make_function(train_step)`.
    assert len(made) == 1


def test_the_multi_worker_test_is_false_without_workers():
    assert not keras_internals.collective_all_reduce_multi_worker(
        tf.distribute.get_strategy())


def test_apply_clips_through_the_replaced_clipping():
    # SGD at lr 1 from w = [1, 2] with g = [3, 4] clipped to [0.3, 0.4]
    # (a tenth, as global norm 0.5 of norm 5 does): w = [0.7, 1.6].
    seen = []

    def clip(grads):
        seen.append(len(grads))
        return [g * 0.1 for g in grads]

    variable = keras.Variable([1.0, 2.0])
    optimizer = keras.optimizers.SGD(1.0)
    keras_internals.replace_gradient_clipping(optimizer, clip)
    optimizer.apply([tf.constant([3.0, 4.0])], [variable])
    assert seen == [1]
    np.testing.assert_allclose(variable.numpy(), [0.7, 1.6], rtol=1e-6)
