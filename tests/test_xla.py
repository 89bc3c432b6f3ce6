"""Both estimators under XLA (`jit_compile=True`, Keras's default on GPU)
and with `steps_per_execution > 1` (what TPUs need)."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import CE
from conftest import tiny_gpt2

from keras_sophia import Sophia
from keras_sophia import estimate_hessian


def compiled_gpt2(jit_compile=False, estimator="gnb",
                  steps_per_execution=1):
    model = tiny_gpt2(64, 16, width=16)
    # epsilon 1e-4, not 1e-12: a coordinate whose true gradient is zero
    # (the attention key biases) has a momentum of float noise, ~1e-9;
    # over a 1e-12 floor it saturates the clip and moves by
    # lr * sign(noise), so XLA's and the graph's rounding would send it
    # opposite ways. Over 1e-4 it moves by at most lr * 1e-5, and every
    # step is a continuous function of the gradients: the runs can agree
    # to float tolerance by construction, not by luck.
    model.compile(
        Sophia(1e-2, hessian_update_interval=2, estimator=estimator, seed=1,
               epsilon=1e-4),
        CE, weighted_metrics=[], jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model


def batch(n=4):
    tokens = np.random.default_rng(0).integers(0, 64, size=(n, 17))
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((n, 16), bool)}
    return x, tokens[:, 1:]


def test_hessian_vector_products_through_slices_match_under_xla():
    # keras-hub's position embedding slices; under XLA the slice gradient
    # is an XlaDynamicUpdateSlice, whose own gradient keras_sophia
    # registers. Fixed probes: the products must agree with the eager ones.
    model = compiled_gpt2()
    x, y = batch()
    probes = [
        np.random.default_rng(i).normal(size=v.shape).astype("float32")
        for i, v in enumerate(model.trainable_variables)
    ]

    def products():
        return estimate_hessian(
            model, x, y, estimator=lambda ctx: ctx.hvp(probes), seed=0
        )

    eager = products()
    compiled = tf.function(products, jit_compile=True)()
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gnb_estimate_is_the_same_under_xla():
    model = compiled_gpt2()
    x, y = batch()

    def estimate():
        return estimate_hessian(model, x, y, estimator="gnb", seed=3)

    eager = estimate()
    compiled = tf.function(estimate, jit_compile=True)()
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)


def fitted(estimator, jit_compile, steps_per_execution):
    """Logits, m and h after 6 steps (refreshes at 0, 2, 4) of batch 4."""
    keras.utils.set_random_seed(0)
    model = compiled_gpt2(jit_compile, estimator, steps_per_execution)
    x, y = batch(24)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert model.optimizer.iterations.numpy() == 6
    slots = {v.name: v.numpy() for v in model.optimizer.variables
             if "momentum" in v.name or "hessian" in v.name}
    return model.predict(x, verbose=0), slots


plain = functools.cache(lambda estimator: fitted(estimator, False, 1))


# Hutchinson's cases take ~50 s each: `large` (the default run keeps GNB's
# and the Hessian-vector products under XLA above).
@pytest.mark.parametrize("estimator", [
    "gnb", pytest.param("hutchinson", marks=pytest.mark.large)])
@pytest.mark.parametrize("jit_compile, steps_per_execution", [
    (False, 3), (True, 3),
])
def test_xla_and_multi_step_executions_follow_the_plain_run(
        estimator, jit_compile, steps_per_execution):
    # steps_per_execution=3 puts refreshes inside an execution (step 4 is
    # the second of the second one): the schedule must follow iterations.
    # With jit_compile the whole execution is one XLA program, as on TPU.
    # Same draws under XLA, so the runs agree to float tolerance (see
    # `compiled_gpt2` for why no coordinate turns on float noise).
    logits, slots = fitted(estimator, jit_compile, steps_per_execution)
    plain_logits, plain_slots = plain(estimator)
    np.testing.assert_allclose(logits, plain_logits, rtol=1e-3, atol=1e-3)
    assert slots.keys() == plain_slots.keys()
    for name, value in slots.items():
        np.testing.assert_allclose(
            value, plain_slots[name], rtol=1e-3, atol=1e-6, err_msg=name
        )
