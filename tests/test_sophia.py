"""The Sophia update rule, checked against values derived by hand.

Unless a test says otherwise: beta_1 = 0.965 (so m = 0.035 * g after one
step from m = 0), beta_2 = 0.99 (so h = 0.01 * e after one update from
h = 0), rho = 0.04, lr = 0.5 and no weight decay.
"""

import warnings

import keras
import numpy as np
import pytest
from conftest import slot_values

from keras_sophia import Hutchinson
from keras_sophia import Sophia


def sophia(**kwargs):
    kwargs.setdefault("learning_rate", 0.5)
    kwargs.setdefault("weight_decay", None)
    kwargs.setdefault("seed", 1)
    return Sophia(**kwargs)


def test_zero_hessian_steps_by_lr_times_sign_of_momentum():
    var = keras.Variable([1.0, 2.0, 3.0])
    opt = sophia()
    opt.update_hessian([np.zeros(3, "float32")], [var])
    opt.apply([np.array([1.0, -6.0, 0.0], "float32")], [var])
    # h = 0: m / max(0, 1e-12) saturates the clip, so the step is
    # lr * sign(m) = 0.5 * [1, -1, 0]; a zero gradient does not move.
    np.testing.assert_allclose(var.numpy(), [0.5, 2.5, 3.0])


def test_curvature_above_momentum_gives_newton_like_step():
    var = keras.Variable([1.0, 2.0, 3.0])
    opt = sophia()
    opt.update_hessian([np.array([100.0, 200.0, 0.0], "float32")], [var])
    opt.apply([np.array([1.0, -1.0, 0.0], "float32")], [var])
    # h = 0.01 * [100, 200, 0] = [1, 2, 0]; rho * h = [0.04, 0.08, 0].
    # m = 0.035 * [1, -1, 0]; m / (rho * h) = [0.875, -0.4375, 0], inside
    # the clip, so var = [1 - 0.5 * 0.875, 2 + 0.5 * 0.4375, 3].
    np.testing.assert_allclose(var.numpy(), [0.5625, 2.21875, 3.0])


def test_negative_hessian_steps_by_lr_times_sign():
    var = keras.Variable([1.0, 1.0])
    opt = sophia()
    opt.update_hessian([np.array([-100.0, -100.0], "float32")], [var])
    opt.apply([np.array([2.0, -2.0], "float32")], [var])
    # h = -1: max(rho * h, eps) = eps, so the step is lr * sign(m).
    # (The authors' "rho * h + eps" would give m / -0.04 = -1.75 -> -1 after
    # the clip, a step uphill: var would be [1.5, 0.5].)
    np.testing.assert_allclose(var.numpy(), [0.5, 1.5])


def test_decoupled_weight_decay_then_step():
    var = keras.Variable([2.0, 1.0, 3.0])
    opt = sophia(weight_decay=0.1)
    opt.update_hessian([np.zeros(3, "float32")], [var])
    opt.apply([np.array([1.0, 0.0, 0.0], "float32")], [var])
    # Decay first: x * (1 - lr * wd) = x * 0.95; then lr * sign(m) on the
    # first coordinate only: [1.9 - 0.5, 0.95, 2.85].
    np.testing.assert_allclose(var.numpy(), [1.4, 0.95, 2.85], rtol=1e-6)


def test_zero_gradient_is_pure_decay():
    var = keras.Variable([1.0, -2.0, 3.0])
    opt = sophia(weight_decay=0.1)
    opt.update_hessian([np.ones(3, "float32")], [var])
    for _ in range(3):
        opt.apply([np.zeros(3, "float32")], [var])
    # m stays 0, so only the decay acts: x * (1 - 0.5 * 0.1) ** 3.
    np.testing.assert_allclose(
        var.numpy(), np.array([1.0, -2.0, 3.0]) * 0.95**3, rtol=1e-6
    )
    np.testing.assert_allclose(slot_values(opt, "momentum")[0], 0.0)


def test_momentum_is_an_ema_without_bias_correction():
    var = keras.Variable([0.0])
    opt = sophia(learning_rate=0.0)
    opt.update_hessian([np.ones(1, "float32")], [var])
    opt.apply([np.array([1.0], "float32")], [var])
    opt.apply([np.array([3.0], "float32")], [var])
    # m = 0.965 * (0.035 * 1) + 0.035 * 3.
    np.testing.assert_allclose(
        slot_values(opt, "momentum")[0], [0.965 * 0.035 + 0.105], rtol=1e-6
    )


def test_update_hessian_ema_builds_the_optimizer_and_skips_none():
    a = keras.Variable([1.0, 1.0])
    b = keras.Variable([[1.0]])
    opt = sophia()
    assert not opt.built
    opt.update_hessian([np.array([10.0, -20.0], "float32"), None], [a, b])
    assert opt.built
    opt.update_hessian(
        [np.array([30.0, 0.0], "float32"), np.array([[5.0]], "float32")],
        [a, b],
    )
    # a: 0.01 * [10, -20] = [0.1, -0.2]; then 0.99 * that + 0.01 * [30, 0].
    # b: skipped the first time, then 0.01 * 5.
    h_a, h_b = slot_values(opt, "hessian")
    np.testing.assert_allclose(h_a, [0.099 + 0.3, -0.198], rtol=1e-6)
    np.testing.assert_allclose(h_b, [[0.05]], rtol=1e-6)


def test_slots_are_named_and_ordered_like_the_variables():
    variables = [keras.Variable(np.zeros(s, "float32")) for s in (2, 3, 4)]
    opt = sophia()
    opt.build(variables)
    for kind in ("momentum", "hessian"):
        shapes = [v.shape for v in opt.variables if kind in v.name]
        assert shapes == [(2,), (3,), (4,)]


@pytest.mark.parametrize(
    "kwargs, grads",
    [
        # clipvalue=1 turns [10, -0.5] into [1, -0.5].
        ({"clipvalue": 1.0}, [[10.0, -0.5]]),
        # The update divides gradients by loss_scale_factor.
        ({"loss_scale_factor": 4.0}, [[4.0, -2.0]]),
        # Two micro-batches averaged: ([2, -1] + [0, 0]) / 2.
        ({"gradient_accumulation_steps": 2}, [[2.0, -1.0], [0.0, 0.0]]),
        # Global norm of [2, -1] is sqrt(5); clip to sqrt(5) / 2.
        ({"global_clipnorm": 5**0.5 / 2}, [[2.0, -1.0]]),
    ],
)
def test_base_optimizer_arguments_act_on_the_gradient(kwargs, grads):
    var = keras.Variable([1.0, 2.0])
    opt = sophia(**kwargs)
    opt.update_hessian([np.array([100.0, 100.0], "float32")], [var])
    for g in grads:
        # A backend tensor, as in `fit`: Keras's global-norm clip on torch
        # fails on NumPy gradients (for AdamW too).
        opt.apply([keras.ops.convert_to_tensor(g, "float32")], [var])
    # Each case reaches the update with g = [1, -0.5]: m = [0.035, -0.0175],
    # rho * h = 0.04, ratio [0.875, -0.4375], var = [1 - 0.4375, 2 + 0.21875].
    np.testing.assert_allclose(var.numpy(), [0.5625, 2.21875], rtol=1e-6)


def test_exclude_from_weight_decay_by_name():
    kernel = keras.Variable([1.0], name="kernel")
    bias = keras.Variable([1.0], name="bias")
    opt = sophia(weight_decay=0.1)
    opt.exclude_from_weight_decay(var_names=["bias"])
    opt.update_hessian([np.ones(1, "float32")] * 2, [kernel, bias])
    opt.apply([np.zeros(1, "float32")] * 2, [kernel, bias])
    np.testing.assert_allclose(kernel.numpy(), [0.95])
    np.testing.assert_allclose(bias.numpy(), [1.0])


def test_learning_rate_schedule_is_followed():
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.5, decay_steps=1, decay_rate=0.5
    )
    var = keras.Variable([0.0])
    opt = sophia(learning_rate=schedule)
    opt.update_hessian([np.zeros(1, "float32")], [var])
    opt.apply([np.array([-1.0], "float32")], [var])
    opt.apply([np.array([-1.0], "float32")], [var])
    # h = 0: steps of lr_t * sign(m) = 0.5 then 0.25.
    np.testing.assert_allclose(var.numpy(), [0.75])


def test_use_ema_keeps_an_average_of_the_weights():
    var = keras.Variable([1.0])
    opt = sophia(use_ema=True, ema_momentum=0.5)
    opt.update_hessian([np.zeros(1, "float32")], [var])
    opt.apply([np.array([1.0], "float32")], [var])  # var 0.5, average 0.5
    opt.apply([np.array([1.0], "float32")], [var])  # var 0.0
    opt.finalize_variable_values([var])
    # The first EMA step copies the weights; then 0.5 * 0.5 + 0.5 * 0.0.
    np.testing.assert_allclose(var.numpy(), [0.25])


def test_update_without_any_hessian_warns_with_the_fix():
    var = keras.Variable([1.0])
    opt = sophia()
    with pytest.warns(UserWarning, match="SophiaTrainStep"):
        opt.apply([np.array([1.0], "float32")], [var])


def test_no_warning_once_a_hessian_arrived():
    var = keras.Variable([1.0])
    opt = sophia()
    opt.update_hessian([np.ones(1, "float32")], [var])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.apply([np.array([1.0], "float32")], [var])


def test_config_round_trip():
    schedule = keras.optimizers.schedules.CosineDecay(3e-4, 1000, alpha=0.1)
    opt = Sophia(
        learning_rate=schedule,
        beta_1=0.9,
        beta_2=0.95,
        rho=0.05,
        epsilon=1e-10,
        weight_decay=0.2,
        hessian_update_interval=7,
        hessian_batch_fraction=0.25,
        estimator=Hutchinson(distribution="normal", num_samples=2),
        seed=123,
        global_clipnorm=1.0,
        gradient_accumulation_steps=4,
        name="my_sophia",
    )
    config = opt.get_config()
    again = Sophia.from_config(config)
    assert again.get_config() == config
    assert isinstance(again.estimator, Hutchinson)
    assert again.estimator.num_samples == 2
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(opt)
    )
    assert isinstance(restored, Sophia)
    assert restored.get_config() == config


def test_seed_is_drawn_once_and_kept_in_the_config():
    opt = Sophia()
    assert Sophia.from_config(opt.get_config()).seed == opt.seed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"beta_1": 1.0}, "beta_1"),
        ({"beta_2": -0.1}, "beta_2"),
        ({"rho": 0.0}, "rho"),
        ({"epsilon": -1e-12}, "epsilon"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"hessian_update_interval": 0}, "hessian_update_interval"),
        ({"hessian_update_interval": 2.5}, "hessian_update_interval"),
        ({"hessian_batch_fraction": 0.0}, "hessian_batch_fraction"),
        ({"hessian_batch_fraction": 1.5}, "hessian_batch_fraction"),
        ({"hessian_batch_fraction": "half"}, "hessian_batch_fraction"),
        ({"estimator": "newton"}, "estimator"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        Sophia(**kwargs)
    assert "Received" in str(error.value)


def test_bad_hutchinson_options_name_the_argument():
    with pytest.raises(ValueError, match="distribution"):
        Hutchinson(distribution="uniform")
    with pytest.raises(ValueError, match="num_samples"):
        Hutchinson(num_samples=0)


def test_win_rate_and_hessian_norm_describe_the_last_update():
    var = keras.Variable([1.0, 2.0, 3.0])
    opt = sophia()
    opt.update_hessian([np.array([100.0, 200.0, 0.0], "float32")], [var])
    opt.apply([np.array([1.0, -3.0, 0.0], "float32")], [var])
    opt.update_diagnostics()
    # h = [1, 2, 0], rho * h = [0.04, 0.08, 0]; m = 0.035 * [1, -3, 0] =
    # [0.035, -0.105, 0]: only the first coordinate was not clipped (the
    # third has 0 < 0 false). ||h|| = sqrt(5).
    np.testing.assert_allclose(opt.win_rate.numpy(), 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(opt.hessian_norm.numpy(), 5**0.5, rtol=1e-6)
    opt.apply([np.array([-1.0, 3.0, 0.0], "float32")], [var])
    opt.update_diagnostics()
    # m = 0.965 * [0.035, -0.105, 0] + 0.035 * [-1, 3, 0]
    #   = [-0.001225, 0.003675, 0]: both now inside.
    np.testing.assert_allclose(opt.win_rate.numpy(), 2 / 3, rtol=1e-6)


def test_plain_fit_takes_sign_steps_warns_and_reloads(tmp_path):
    # Keras's own train step, on every backend torch included: no Hessian
    # estimate reaches h, so it warns, and with h = 0 each of the 4 steps
    # moves every weight by exactly lr * sign(m): after 4 steps by an even
    # multiple of lr (wd = 0).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 3, size=32)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile(sophia(learning_rate=0.25),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.copy() for w in model.get_weights()]
    with pytest.warns(UserWarning, match="SophiaTrainStep"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for b, a in zip(before, model.get_weights()):
        multiples = (a - b) / 0.25
        np.testing.assert_allclose(multiples, np.round(multiples), atol=1e-4)
        assert np.all(np.round(multiples) % 2 == 0)
        assert np.any(multiples != 0)

    model.save(tmp_path / "plain.keras")
    loaded = keras.saving.load_model(tmp_path / "plain.keras")
    assert isinstance(loaded.optimizer, Sophia)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations.numpy()) == 4
    for a, b in zip(slot_values(model.optimizer, "momentum"),
                    slot_values(loaded.optimizer, "momentum")):
        np.testing.assert_array_equal(a, b)
    # The reloaded optimizer has not warned yet: it does, once.
    with pytest.warns(UserWarning, match="SophiaTrainStep"):
        for m in (model, loaded):
            m.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_train_step_mixin_is_the_backends_own():
    # One mixin per backend around the one refresh sequence (refresh.py):
    # TensorFlow's, JAX's or torch's, and the model is made with it.
    from keras_sophia import SophiaTrainStep

    class LM(SophiaTrainStep, keras.Model):
        pass

    module = {"tensorflow": "tf_step", "jax": "jax_step",
              "torch": "torch_step"}[keras.backend.backend()]
    assert SophiaTrainStep.__module__ == f"keras_sophia.{module}"
    inputs = keras.Input((4,))
    assert isinstance(LM(inputs, keras.layers.Dense(3)(inputs)),
                      SophiaTrainStep)


def test_auto_chunks_are_the_estimators_and_divide_the_share():
    # At most GNB 2 and Hutchinson 8 chunks (BENCHMARKS.md), or the
    # largest divisor of the share below that; other estimators 1; a set
    # number is kept as it is.
    gnb, hutchinson = (Sophia(estimator=e) for e in ("gnb", "hutchinson"))
    assert [gnb.chunks_for(n) for n in (12, 7)] == [2, 1]
    assert [hutchinson.chunks_for(n) for n in (16, 12, 5, 11)] == [8, 6, 5, 1]
    assert Sophia(estimator=lambda context: []).chunks_for(12) == 1
    assert Sophia(hessian_chunks=3).chunks_for(12) == 3
    # With the sizes: ceil(share * example_bytes / parameter_bytes), in
    # [1, most]. Parameters dominate: one pass (12 * 10 / 1000 -> 1);
    # 12 * 100 / 1000 -> 2; 12 * 1000 / 1000 -> 12, so the most.
    assert [hutchinson.chunks_for(12, b, 1000) for b in (10, 100, 1000)] == [
        1, 2, 6]
    assert [gnb.chunks_for(12, b, 1000) for b in (10, 100, 1000)] == [1, 2, 2]
    # A batch size unknown when the step is traced: the same rule at run
    # time, without the divisor (the chunks may differ by a row).
    share = keras.ops.convert_to_tensor(12)
    assert [int(hutchinson.chunks_for(share, b, 1000))
            for b in (10, 100, 1000)] == [1, 2, 8]
    assert hutchinson.chunks_for(share) == 8
    # Only hessian_chunks=1 on the whole batch shares the training pass.
    assert Sophia(hessian_chunks=1).shares_training_pass
    assert not Sophia(hessian_chunks=1,
                      hessian_batch_fraction=0.5).shares_training_pass
    assert not Sophia().shares_training_pass
    with pytest.raises(ValueError, match="hessian_chunks"):
        Sophia(hessian_chunks=0)
