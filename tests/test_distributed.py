"""MirroredStrategy on logical CPUs (conftest makes four): every replica
ends each step with the same weights, m and h, and those equal a
single-device run on the same global batches."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import CE
from conftest import CPUS
from conftest import classification_data
from conftest import mirrored
from conftest import replica_values
from conftest import state
from conftest import tiny_classifier
from conftest import train

from keras_sophia import EstimatorContext
from keras_sophia import Sophia


@pytest.fixture
def fixed_draws(monkeypatch):
    """Every uniform draw is 0.25 (Rademacher probes all -1; GNB samples
    the class at the CDF's first quartile), so one device and several
    replicas see the same "random" numbers and can be compared exactly.
    Whether replicas draw different numbers is tested separately."""
    monkeypatch.setattr(
        EstimatorContext, "uniform",
        lambda self, shape, per_example=False: tf.fill(shape, 0.25),
    )


OPTIMIZERS = {
    "sophia-g": lambda: Sophia(0.05, hessian_update_interval=2, seed=1),
    "sophia-h": lambda: Sophia(
        0.05, hessian_update_interval=2, estimator="hutchinson", seed=1
    ),
    # The estimator in chunks inside each replica's refresh (a loop in
    # the cond in replica context), summed before the replicas' sums.
    "sophia-g-chunked": lambda: Sophia(
        0.05, hessian_update_interval=2, seed=1, hessian_chunks=2
    ),
    "sophia-h-chunked": lambda: Sophia(
        0.05, hessian_update_interval=2, estimator="hutchinson", seed=1,
        hessian_chunks=2
    ),
    # A clip norm far below the gradient norm: the clip must act on the
    # averaged gradient, as on one device (stock Keras clips per replica).
    "sophia-g-clipped": lambda: Sophia(
        0.05, hessian_update_interval=2, seed=1, global_clipnorm=1e-3
    ),
    "adamw-clipped": lambda: keras.optimizers.AdamW(
        0.05, global_clipnorm=1e-3
    ),
}


@pytest.mark.parametrize("replicas", [2, 4])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_replicas_match_each_other_and_one_device(name, replicas,
                                                  fixed_draws):
    one = state(train(OPTIMIZERS[name]))
    many = state(train(OPTIMIZERS[name], tuple(CPUS[:replicas])))
    for (single,), copies in zip(one, many):
        assert len(copies) == replicas
        for copy in copies:
            # Identical on every replica, bit for bit.
            np.testing.assert_array_equal(copy, copies[0])
        # Equal to one device up to the order of float additions. m and h
        # agree to ~1e-8; an unclipped coordinate moves lr * m / (rho * h),
        # which turns 1e-8 in m into ~2e-6 in the weight here (rho * h ~
        # 2e-4). A wrong reduction is off by O(1) relative, not 1e-5.
        np.testing.assert_allclose(copies[0], single, rtol=2e-5, atol=1e-5)


def test_gnb_squares_the_reduced_gradient(fixed_draws):
    # The replica sums s_r and counts B_r are added before squaring:
    # h = (1 - beta_2) * (s_1 + s_2)^2 / (B_1 + B_2). Squaring on each
    # replica, then averaging, gives (1 - beta_2) * mean(s_r^2 / B_r), which
    # differs whenever the replica gradients differ, so this compares the
    # first h with the one-device h on the same labels.
    def make():
        return Sophia(0.0, hessian_update_interval=100, seed=1)

    x, y = classification_data(n=16)
    one = train(make, x=x, y=y, steps=1).optimizer
    two = train(make, tuple(CPUS[:2]), x=x, y=y, steps=1).optimizer
    for h_one, h_two in zip(one.variables, two.variables):
        if "hessian" in h_one.name:
            assert np.any(h_one.numpy() != 0)
            np.testing.assert_allclose(
                replica_values(h_two)[1], h_one.numpy(), rtol=2e-5,
                atol=1e-9,
            )


def test_replicas_draw_their_own_numbers():
    # The "estimate" is the draw itself; beta_2 = 0 makes h the estimate.
    # One device: h = U_0 (replica 0's stream). Two replicas: h is the
    # mean (U_0 + U_1) / 2, so U_1 = 2 h - U_0; identical streams would
    # give U_1 == U_0.
    def make():
        return Sophia(0.0, beta_2=0.0, seed=3, estimator=lambda ctx: [
            ctx.uniform(tuple(v.shape)) for v in ctx.variables
        ])

    x, y = classification_data(n=16)
    one = train(make, x=x, y=y, steps=1).optimizer
    two = train(make, tuple(CPUS[:2]), x=x, y=y, steps=1).optimizer
    for h_one, h_two in zip(one.variables, two.variables):
        if "hessian" in h_one.name:
            u_0 = h_one.numpy()
            u_1 = 2 * replica_values(h_two)[0] - u_0
            assert np.all((u_1 > -1e-6) & (u_1 < 1 + 1e-6))
            assert np.mean(np.abs(u_1 - u_0)) > 0.1  # ~1/3 if independent


@pytest.mark.parametrize("option", [
    {"gradient_accumulation_steps": 2},
    {"use_ema": True, "ema_overwrite_frequency": 2},
])
def test_options_that_cannot_cross_replicas_are_refused(option):
    name = next(iter(option.keys() - {"use_ema"}))
    with pytest.raises(ValueError, match=f"`{name}=2` cannot be used with"):
        train(lambda: Sophia(0.01, seed=1, **option), tuple(CPUS[:2]))


@pytest.mark.parametrize("interval", [100, 1])
def test_overflow_on_one_replica_skips_the_step_everywhere(interval,
                                                           fixed_draws):
    # mixed_float16: Keras wraps Sophia in a LossScaleOptimizer. Replica 1's
    # half of the second batch is NaN; stock Keras decides "finite" from
    # replica 0 and writes NaN into the weights. Here the step is skipped
    # on both replicas: the state equals that after the first batch alone
    # (same strategy, so the same float16 arithmetic). With interval 1 the
    # NaN step is a refresh: its estimate must not reach h either.
    x, y = classification_data(n=32)
    x[24:] = np.nan

    def make():
        return Sophia(0.05, hessian_update_interval=interval, seed=1)

    devices = tuple(CPUS[:2])
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        one = train(make, devices, x=x[:16], y=y[:16], steps=1)
        two = train(make, devices, x=x, y=y, steps=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    sophia = two.optimizer.inner_optimizer
    assert sophia.iterations.numpy() == 1  # Sophia's own counter
    assert sophia.skipped_steps.numpy() == 1
    assert sophia.skipped_refreshes.numpy() == (1 if interval == 1 else 0)
    for before, after in zip(
        one.trainable_variables + one.optimizer.inner_optimizer.variables,
        two.trainable_variables + sophia.variables,
    ):
        if "skipped" in after.name:
            continue
        for copy in replica_values(after):
            assert np.all(np.isfinite(copy))
            np.testing.assert_array_equal(copy, replica_values(before)[0])


@pytest.mark.parametrize("option, value", [
    ("jit_compile", True), ("steps_per_execution", 2),
])
def test_compile_options_stock_keras_cannot_distribute_are_refused(
        option, value):
    strategy = mirrored(tuple(CPUS[:2]))
    with strategy.scope():
        model = tiny_classifier()
        model.compile(Sophia(0.01, seed=1), CE, **{option: value})
    x, y = classification_data(n=16)
    with pytest.raises(ValueError, match=f"`{option}` is not supported"):
        model.fit(x, y, batch_size=16, verbose=0)
