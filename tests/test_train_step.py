"""SophiaTrainStep inside `fit`: the k-step schedule, what a refresh step
does, saving and resuming, and Sophia against Adam on a toy problem.

Backend-neutral but for the tests marked `tensorflow`: `.ci/run` runs
this file on TensorFlow, JAX and torch."""

import warnings

import keras
import numpy as np
import pytest
from conftest import CE
from conftest import SophiaModel
from conftest import classification_data
from conftest import gradients
from conftest import slot_values
from conftest import tiny_classifier

from keras_sophia import Sophia
from keras_sophia import estimate_hessian


class HessianChanges(keras.callbacks.Callback):
    """Records, per batch, `iterations` before it and whether h changed."""

    def __init__(self):
        super().__init__()
        self.steps, self.changed = [], []

    # Through `self.model`: on JAX that writes the trainer's state back to
    # the variables, which it otherwise does at the end of an epoch.
    def on_train_batch_begin(self, batch, logs=None):
        self.steps.append(int(self.model.optimizer.iterations.numpy()))
        self.before = slot_values(self.model.optimizer, "hessian")

    def on_train_batch_end(self, batch, logs=None):
        after = slot_values(self.model.optimizer, "hessian")
        self.changed.append(
            any(not np.array_equal(a, b) for a, b in zip(self.before, after))
        )


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
@pytest.mark.parametrize("run_eagerly", [False, True])
def test_hessian_changes_exactly_on_refresh_steps(estimator, run_eagerly):
    x, y = classification_data()
    model = tiny_classifier()
    opt = Sophia(1e-2, hessian_update_interval=3, estimator=estimator, seed=0)
    model.compile(opt, CE, run_eagerly=run_eagerly)
    model.optimizer.build(model.trainable_variables)
    record = HessianChanges()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[record])
    assert record.steps == list(range(16))
    assert record.changed == [t % 3 == 0 for t in range(16)]


@pytest.mark.tensorflow  # refused by name on JAX (tests_jax)
def test_gradient_accumulation_counts_the_schedule_in_updates():
    # k = 2 updates, 3 micro-batches per update: h is refreshed on the first
    # micro-batch of updates 0, 2 and 4, i.e. micro-batches 0, 6 and 12.
    x, y = classification_data(n=144)
    model = tiny_classifier()
    opt = Sophia(1e-2, hessian_update_interval=2, seed=0,
                 gradient_accumulation_steps=3)
    model.compile(opt, CE)
    model.optimizer.build(model.trainable_variables)
    record = HessianChanges()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[record])
    assert record.steps == [t // 3 for t in range(18)]
    assert record.changed == [t % 6 == 0 for t in range(18)]


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_refresh_step_is_estimate_then_update_then_ordinary_step(estimator):
    x, y = classification_data(n=8)
    trained = tiny_classifier()
    by_hand = tiny_classifier()
    by_hand.set_weights(trained.get_weights())
    for model in (trained, by_hand):
        model.compile(Sophia(0.1, seed=4, estimator=estimator), CE)

    trained.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)

    # Step 0 by hand: estimate at the current weights on the batch (same
    # seed, derived from iterations = 0), update h, then the plain update.
    variables = by_hand.trainable_variables
    estimates = estimate_hessian(by_hand, x, y, seed=4)
    by_hand.optimizer.update_hessian(estimates, variables)
    by_hand.optimizer.apply(gradients(by_hand, CE, x, y), variables)

    for kind in ("hessian", "momentum"):
        for a, b in zip(
            slot_values(trained.optimizer, kind),
            slot_values(by_hand.optimizer, kind),
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    for a, b in zip(trained.get_weights(), by_hand.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_hessian_batch_fraction_estimates_on_the_leading_examples(estimator):
    # 0.4 of a batch of 8: the refresh estimates on floor(3.2) = 3 examples,
    # the training gradient still uses all 8.
    x, y = classification_data(n=8)
    sliced = tiny_classifier()
    whole = tiny_classifier()
    whole.set_weights(sliced.get_weights())
    sliced.compile(Sophia(0.1, seed=4, estimator=estimator,
                          hessian_batch_fraction=0.4), CE)
    whole.compile(Sophia(0.1, seed=4, estimator=estimator), CE)
    estimates = estimate_hessian(whole, x[:3], y[:3], seed=4)

    for model in (sliced, whole):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)

    # Step 0 from h = 0: h = (1 - beta_2) * estimate on the first 3.
    for h, e in zip(slot_values(sliced.optimizer, "hessian"), estimates):
        np.testing.assert_allclose(h, 0.01 * np.asarray(e), rtol=1e-5,
                                   atol=1e-9)
    # m = (1 - beta_1) * g on the whole batch, as without the option.
    for a, b in zip(slot_values(sliced.optimizer, "momentum"),
                    slot_values(whole.optimizer, "momentum")):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert not np.allclose(slot_values(sliced.optimizer, "hessian")[0],
                           slot_values(whole.optimizer, "hessian")[0])


def test_other_optimizers_get_the_plain_keras_step():
    x, y = classification_data()
    mixed_in = tiny_classifier()
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    plain = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    plain.set_weights(mixed_in.get_weights())
    for model in (mixed_in, plain):
        model.compile(keras.optimizers.Adam(1e-2), CE)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(mixed_in.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_custom_estimator_callable_feeds_h():
    x, y = classification_data(n=16)
    model = tiny_classifier()
    # A constant "curvature" of 3 everywhere: h = 0.01 * 3 after step 0.
    opt = Sophia(1e-2, estimator=lambda ctx: [
        3.0 * keras.ops.ones_like(v) for v in ctx.variables
    ])
    model.compile(opt, CE)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for h in slot_values(opt, "hessian"):
        np.testing.assert_allclose(h, 0.03, rtol=1e-6)


def test_gnb_with_a_regression_loss_fails_before_training():
    x, _ = classification_data()
    model = tiny_classifier()
    model.compile(Sophia(1e-2, estimator="gnb"), "mse")
    with pytest.raises(ValueError, match="estimator='hutchinson'"):
        model.fit(x, np.zeros((64, 3)), epochs=1, verbose=0)


def test_plain_model_with_sophia_warns_about_the_missing_hessian():
    x, y = classification_data()
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile(Sophia(1e-2), CE)
    with pytest.warns(UserWarning, match="SophiaTrainStep"):
        model.fit(x, y, epochs=1, verbose=0)


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_a_first_step_without_a_refresh_does_not_warn(run_eagerly):
    # Restored mid-interval (iterations = 1, k = 3), the model's first step
    # is no refresh. Where a step runs one branch only (eager, and every
    # step on torch), no refresh has run before the first `apply`; the
    # mixin is still h's source, so the missing-Hessian warning is wrong.
    x, y = classification_data(n=16)
    model = tiny_classifier()
    model.compile(Sophia(1e-2, hessian_update_interval=3), CE,
                  run_eagerly=run_eagerly)
    model.optimizer.iterations.assign(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2
    assert not [w for w in caught if "SophiaTrainStep" in str(w.message)]


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_keras_file_restores_state_and_continues_identically(
    estimator, tmp_path
):
    x, y = classification_data()
    model = tiny_classifier()
    model.compile(
        Sophia(1e-2, hessian_update_interval=3, estimator=estimator, seed=9),
        CE,
    )
    # 4 steps: the next one (iterations = 4) is not a refresh, the one after
    # the next two (iterations = 6) is.
    model.fit(x[:32], y[:32], batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)

    assert isinstance(loaded.optimizer, Sophia)
    assert int(loaded.optimizer.iterations.numpy()) == 4
    for kind in ("momentum", "hessian"):
        for a, b in zip(
            slot_values(model.optimizer, kind),
            slot_values(loaded.optimizer, kind),
        ):
            np.testing.assert_array_equal(a, b)

    # Five more steps cross the refresh at iterations = 6: both copies draw
    # the same estimator randoms and end identical.
    for m in (model, loaded):
        m.fit(x[:40], y[:40], batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    for kind in ("momentum", "hessian"):
        for a, b in zip(slot_values(model.optimizer, kind),
                        slot_values(loaded.optimizer, kind)):
            np.testing.assert_array_equal(a, b)


def steps_to_target(optimizer, max_steps=600):
    """Full-batch least squares with curvatures 100, 9, 0.09 and 0.01.

    Returns the first step after which the loss is below 1e-4 of its value
    at w = 0, or None.
    """
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 4)))
    scales = np.array([10.0, 3.0, 0.3, 0.1])
    # H = (2 / 8) x^T x = diag(scales^2): orthogonal columns.
    x = (q * scales * 2.0).astype("float32")
    w_star = np.array([0.05, -0.2, 1.0, -2.0])
    y = (x @ w_star).astype("float32")[:, None]

    def loss_at(w):
        return np.mean((x @ w[:, 0] - y[:, 0]) ** 2)

    target = 1e-4 * loss_at(np.zeros((4, 1)))
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")
    model = SophiaModel(inputs, dense(inputs))
    model.compile(optimizer, "mse")
    reached = []

    class StopAtTarget(keras.callbacks.Callback):
        # An epoch is one step; at its end the weights are current on
        # every backend.
        def on_epoch_end(self, epoch, logs=None):
            if loss_at(dense.kernel.numpy()) < target:
                reached.append(epoch + 1)
                self.model.stop_training = True

    model.fit(x, y, batch_size=len(x), epochs=max_steps, verbose=0,
              callbacks=[StopAtTarget()])
    return reached[0] if reached else None


def test_sophia_beats_tuned_adam_on_heterogeneous_curvature():
    # Adam moves every coordinate by about lr per step whatever its
    # curvature, so it must pick one lr for a 10^4 spread of curvatures.
    # Sophia's clipped Newton step takes the sharp coordinates home in a few
    # steps and lets the flat ones move at lr. Deterministic: full batch,
    # and Hutchinson with +-1 probes is exact on a diagonal Hessian.
    adam = {
        lr: steps_to_target(keras.optimizers.Adam(lr))
        for lr in (0.01, 0.03, 0.1, 0.3, 1.0)
    }
    best_adam = min(s for s in adam.values() if s is not None)
    sophia = steps_to_target(
        Sophia(
            learning_rate=1.0,
            beta_1=0.9,
            beta_2=0.9,
            rho=2.0,
            weight_decay=None,
            hessian_update_interval=1,
            estimator="hutchinson",
            seed=0,
        )
    )
    print(f"steps to 1e-4 of the initial loss: Adam {adam}, Sophia {sophia}")
    assert sophia is not None and sophia < best_adam


@pytest.mark.tensorflow  # the README's loop uses tf.GradientTape
def test_custom_loop_as_in_the_readme():
    import tensorflow as tf

    x, y = classification_data(n=16)
    model = tiny_classifier()
    model.compile(loss=CE)  # estimate_hessian needs the compiled loss
    opt = Sophia(1e-2, hessian_update_interval=2, seed=3)
    variables = model.trainable_variables
    changed = []
    for step in range(5):
        # Before step 0 the optimizer is unbuilt and has no slots yet; the
        # h it builds them with is zero.
        before = slot_values(opt, "hessian") or [
            np.zeros(v.shape) for v in variables]
        if opt.should_refresh_hessian():
            estimates = estimate_hessian(
                model, x, y, estimator=opt.estimator, seed=[opt.seed, step]
            )
            opt.update_hessian(estimates, variables)
        with tf.GradientTape() as tape:
            loss = CE(y, model(x, training=True))
        opt.apply(tape.gradient(loss, variables), variables)
        after = slot_values(opt, "hessian")
        assert len(after) == len(variables)
        changed.append(
            any(not np.array_equal(a, b) for a, b in zip(before, after))
        )
    assert changed == [True, False, True, False, True]


def test_fit_logs_win_rate_and_hessian_norm():
    x, y = classification_data()
    model = tiny_classifier()
    # k = 1: every step refreshes, so the logs describe the final m and h.
    # rho = 1 puts the clip threshold inside the spread of |m| / h here
    # (measured: 0.4 of the coordinates unclipped; 0 at rho = 0.04).
    opt = Sophia(1e-2, rho=1.0, hessian_update_interval=1, seed=0)
    model.compile(opt, CE)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    m = np.concatenate([v.ravel() for v in slot_values(opt, "momentum")])
    h = np.concatenate([v.ravel() for v in slot_values(opt, "hessian")])
    assert m.size == h.size == model.count_params()
    # The share of coordinates the clip leaves alone, |m| < rho * h.
    unclipped = np.mean(np.abs(m) < opt.rho * h)
    assert 0.0 < unclipped < 1.0  # so a clipped share would not match
    np.testing.assert_allclose(history.history["win_rate"][-1], unclipped,
                               rtol=1e-6)
    np.testing.assert_allclose(history.history["hessian_norm"][-1],
                               np.linalg.norm(h), rtol=1e-5)


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_mixed_bfloat16_keeps_float32_state_and_trains(estimator):
    # On every backend (JAX and torch have no loss scaling: bfloat16 is
    # their mixed precision).
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        x, y = classification_data(n=64)
        model = tiny_classifier()
        model.compile(Sophia(1e-2, hessian_update_interval=2, seed=0,
                             estimator=estimator), CE)
        losses = model.fit(x, y, batch_size=16, epochs=3,
                           verbose=0).history["loss"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # The model computes in bfloat16 (its output, and so GNB's cotangent,
    # too); the weights, m and h stay float32, and h was refreshed.
    assert all(w.dtype == np.float32 for w in model.get_weights())
    for kind in ("hessian", "momentum"):
        slots = slot_values(model.optimizer, kind)
        assert all(s.dtype == np.float32 for s in slots)
        assert all(np.any(s != 0) for s in slots)
    assert all(np.isfinite(h).all()
               for h in slot_values(model.optimizer, "hessian"))
    assert int(model.optimizer.skipped_refreshes.numpy()) == 0
    assert losses[2] < losses[1] < losses[0]


def test_a_non_finite_gradient_skips_the_step_and_leaves_h_alone():
    # On every backend (test_nonfinite.py has TensorFlow's variants).
    x, y = classification_data(n=8)
    x[0, 0] = np.nan
    model = tiny_classifier()
    model.compile(Sophia(0.1, seed=0), CE)
    weights = model.get_weights()
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    for h in slot_values(model.optimizer, "hessian"):
        np.testing.assert_array_equal(h, 0.0)
    assert history.history["skipped_steps"] == [1]
    assert history.history["skipped_refreshes"] == [1]
    assert int(model.optimizer.iterations.value) == 0


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
@pytest.mark.parametrize("chunks, fraction", [(2, 1.0), (1, 0.5), (1, 1.0)])
def test_a_refresh_leaves_model_state_as_an_ordinary_step_does(
        estimator, chunks, fraction):
    # BatchNormalization's moving statistics and Dropout's seed generator
    # after one refresh step (step 0) equal those after one step of plain
    # Keras (SGD) from the same weights: the estimator's own passes
    # (chunks, or a part of the batch) change no model state. Before, each
    # chunk's pass moved the statistics once more on TensorFlow and torch.
    x, y = classification_data(n=8)

    def after_one_step(optimizer):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,))
        h = keras.layers.Dense(8)(inputs)
        h = keras.layers.BatchNormalization(momentum=0.5)(h)
        h = keras.layers.Dropout(0.5, seed=3)(keras.activations.tanh(h))
        model = SophiaModel(inputs, keras.layers.Dense(3)(h))
        model.compile(optimizer, CE)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        return [v.numpy() for v in model.non_trainable_variables]

    sophia = after_one_step(Sophia(0.01, seed=0, estimator=estimator,
                                   hessian_chunks=chunks,
                                   hessian_batch_fraction=fraction))
    plain = after_one_step(keras.optimizers.SGD(0.01))
    assert len(sophia) >= 3  # moving mean, moving variance, seed state
    assert any(np.any(p != 0) and np.any(p != 1) for p in plain)
    for got, want in zip(sophia, plain):
        np.testing.assert_array_equal(got, want)


def chunks_seen(sophia, batch=8, static=True):
    """h after one refresh of a tiny classifier on `batch` examples, with
    beta_2 = 0 and an estimate of n**2 on a chunk of n examples: the
    refresh sums n**2 * n over its chunks and divides by the share, so h
    is sum(n**3) / sum(n), which tells how the share was cut. On
    TensorFlow the batch is a `tf.data` batch with `drop_remainder=static`:
    without it, its size is unknown when the step is traced, as for `fit`
    on arrays whose last batch is a partial one."""
    x, y = classification_data(n=batch)
    model = tiny_classifier()
    model.compile(sophia, CE)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(
            batch, drop_remainder=static)
        assert data.element_spec[0].shape[0] == (batch if static else None)
        model.fit(data, epochs=1, verbose=0, shuffle=False)
    else:
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    return float(slot_values(model.optimizer, "hessian")[0].flat[0])


def sized(**kwargs):
    return Sophia(0.01, beta_2=0.0, seed=0, estimator=lambda ctx: [
        keras.ops.ones(v.shape) * ctx.examples ** 2 for v in ctx.variables
    ], **kwargs)


@pytest.mark.parametrize("static", [True, False])
def test_chunks_cut_the_share_as_documented(static):
    # 8 rows in 2 chunks of 4: (2 * 4**3) / 8 = 16; in 1 pass: 8**2 = 64;
    # the leading half in 2 chunks of 2: (2 * 2**3) / 4 = 4.
    assert chunks_seen(sized(hessian_chunks=2), static=static) == 16
    assert chunks_seen(sized(hessian_chunks=1), static=static) == 64
    assert chunks_seen(sized(hessian_chunks=2, hessian_batch_fraction=0.5),
                       static=static) == 4


@pytest.mark.tensorflow  # a batch size unknown when the step is traced
def test_a_share_of_unknown_size_is_cut_into_chunks_a_row_apart():
    # 7 rows in 3 chunks: 2, 2 and 3 rows, (8 + 8 + 27) / 7.
    assert chunks_seen(sized(hessian_chunks=3), batch=7,
                       static=False) == pytest.approx(43 / 7)


@pytest.mark.parametrize("static", [True, False])
def test_auto_chunks_weigh_the_output_against_the_parameters(
        static, monkeypatch):
    # The tiny classifier: 75 parameters (300 bytes); one example's output
    # of 3 logits costs the refresh 4 float32 copies, 48 bytes. So auto
    # takes ceil(share * 48 / 300) chunks, at most the estimator's most
    # (here set to 4 for the test's estimator): share 8 -> 2 chunks (16),
    # share 2 -> 1 (4), share 32 -> 4 chunks of 8 (64). A batch size
    # unknown when the step is traced gets the same chunks.
    from keras_sophia import estimators
    from keras_sophia import sophia as sophia_lib

    monkeypatch.setitem(sophia_lib._AUTO_MOST,
                        estimators.FunctionEstimator, 4)
    assert chunks_seen(sized(), static=static) == 16
    assert chunks_seen(sized(), batch=2, static=static) == 4
    assert chunks_seen(sized(), batch=32, static=static) == 64
