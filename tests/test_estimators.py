"""Estimators against Hessian / Fisher diagonals known in closed form.

Backend-neutral: `.ci/run` runs this file on TensorFlow and on JAX."""

import keras
import numpy as np
import pytest
from conftest import SophiaModel
from conftest import estimate_draws
from conftest import least_squares

from keras_sophia import GaussNewtonBartlett
from keras_sophia import HessianEstimator
from keras_sophia import Hutchinson
from keras_sophia import Sophia
from keras_sophia import estimate_hessian
from keras_sophia import estimators


def mean_estimate(model, x, y, estimator, draws, sample_weight=None):
    """Average of `draws` estimates, each from its own seed."""
    one = estimate_draws(model, x, y, estimator, sample_weight)
    total = None
    for i in range(draws):
        est = one(i)
        total = est if total is None else [t + e for t, e in zip(total, est)]
    return [t / draws for t in total]


def test_hutchinson_mean_approaches_least_squares_hessian_diagonal():
    model, x, y = least_squares()
    # L = mean_n (x_n . w + b - y_n)^2, so H = (2 / n) [x 1]^T [x 1]:
    # diag = (2 / n) sum_n x_ni^2 for the kernel and 2 for the bias.
    kernel_diag = 2.0 * np.mean(x**2, axis=0)[:, None]
    # The off-diagonal terms make single estimates noisy (correlated
    # features); 1500 Rademacher probes bring the mean within a few %.
    kernel, bias = mean_estimate(model, x, y, Hutchinson(), draws=1500)
    np.testing.assert_allclose(kernel, kernel_diag, rtol=0.1)
    np.testing.assert_allclose(bias, [2.0], rtol=0.1)


def test_hutchinson_with_gaussian_probes_is_unbiased_too():
    model, x, y = least_squares()
    kernel_diag = 2.0 * np.mean(x**2, axis=0)[:, None]
    estimator = Hutchinson(distribution="normal", num_samples=4)
    kernel, _ = mean_estimate(model, x, y, estimator, draws=500)
    np.testing.assert_allclose(kernel, kernel_diag, rtol=0.15)


def test_hutchinson_is_exact_when_the_hessian_is_diagonal():
    # Orthogonal feature columns make H diagonal, and u * (D u) = D u^2 = D
    # for any +-1 probe: one estimate is already exact.
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 3)))
    x = (q * [3.0, 1.0, 0.1]).astype("float32")
    inputs = keras.Input((3,))
    model = SophiaModel(
        inputs, keras.layers.Dense(1, use_bias=False)(inputs)
    )
    model.compile(Sophia(seed=0), loss="mse")
    (kernel,) = estimate_hessian(
        model, x, np.zeros((8, 1), "float32"), estimator="hutchinson", seed=3
    )
    np.testing.assert_allclose(
        np.asarray(kernel)[:, 0], 2.0 / 8 * np.array([9.0, 1.0, 0.01]), rtol=1e-5
    )


def test_rademacher_probes_take_both_signs_evenly():
    model, x, y = least_squares(d=50)
    # Return the probes themselves as the "estimate".
    kernel, _ = estimate_hessian(
        model, x, y, estimator=lambda ctx: Hutchinson().probes(ctx), seed=5
    )
    values = np.asarray(kernel).ravel()
    assert set(np.unique(values)) == {-1.0, 1.0}
    assert 15 <= np.sum(values > 0) <= 35  # 50 fair coin flips


def logistic_regression(from_logits, n=16, d=3, classes=4, seed=0):
    """Multinomial logistic regression; labels are each row's least likely
    class, so true-label gradients are large and the empirical Fisher is far
    from the real one."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    inputs = keras.Input((d,))
    dense = keras.layers.Dense(
        classes,
        use_bias=False,
        activation=None if from_logits else "softmax",
        kernel_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=1),
    )
    model = SophiaModel(inputs, dense(inputs))
    loss = (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if from_logits
        else "sparse_categorical_crossentropy"
    )
    model.compile(Sophia(seed=0), loss=loss)
    logits = x @ dense.kernel.numpy()
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return model, x, np.argmin(p, axis=-1), p


@pytest.mark.parametrize("from_logits", [True, False])
def test_gnb_mean_approaches_the_fisher_diagonal(from_logits):
    model, x, y, p = logistic_regression(from_logits)
    # Fisher (= Gauss-Newton for softmax CE) diagonal of the mean loss, for
    # kernel entry (i, c): mean_n x_ni^2 p_nc (1 - p_nc).
    fisher = np.einsum("ni,nc->ic", x**2, p * (1 - p)) / len(x)
    (kernel,) = mean_estimate(model, x, y, "gnb", draws=2000)
    np.testing.assert_allclose(kernel, fisher, rtol=0.12, atol=1e-4)


def test_gnb_is_not_the_squared_true_label_gradient():
    model, x, y, p = logistic_regression(from_logits=True)
    fisher = np.einsum("ni,nc->ic", x**2, p * (1 - p)) / len(x)

    # What broken ports compute: B * (true-label mean gradient)^2.
    def empirical(ctx):
        return [len(x) * g**2 for g in ctx.grads]

    (squared,) = estimate_hessian(model, x, y, estimator=empirical)
    relative_gap = np.abs(np.asarray(squared) - fisher).sum() / fisher.sum()
    assert relative_gap > 1.0


def test_gnb_leaves_out_zero_weight_terms():
    model, x, y, p = logistic_regression(from_logits=True)
    weights = np.array([1.0, 0.0] * 8, "float32")
    kept = weights > 0
    # Only the 8 weighted rows count, and B = 8.
    fisher = np.einsum("ni,nc->ic", x[kept] ** 2, (p * (1 - p))[kept]) / 8
    (kernel,) = mean_estimate(
        model, x, y, "gnb", draws=2000, sample_weight=weights
    )
    np.testing.assert_allclose(kernel, fisher, rtol=0.12, atol=1e-4)


class SampledGradient(GaussNewtonBartlett):
    """GNB without the squaring: returns g_hat itself."""

    def finalize(self, sums, count):
        return HessianEstimator.finalize(self, sums, count)


def test_gnb_sampled_labels_follow_the_model_distribution():
    model, _, _, _ = logistic_regression(from_logits=True)
    probs = np.array([0.7, 0.2, 0.05, 0.05])
    model.layers[-1].kernel.assign(np.log([probs] * 3))
    # One example x = [1, 0, 0]: kernel row 0 of g_hat is p - onehot(y_hat),
    # negative only at the sampled class.
    x, y = np.eye(3, dtype="float32")[:1], np.zeros(1)
    one = estimate_draws(model, x, y, SampledGradient())
    np.testing.assert_allclose(one(0)[0][1:], 0.0)  # rows of inputs that are 0
    counts = np.bincount([np.argmin(one(i)[0][0]) for i in range(800)],
                         minlength=4)
    np.testing.assert_allclose(counts / 800, probs, atol=0.05)


def test_gnb_with_another_loss_points_to_hutchinson():
    model, x, y = least_squares()
    with pytest.raises(ValueError, match="hutchinson"):
        estimate_hessian(model, x, y, estimator=GaussNewtonBartlett())


@pytest.mark.parametrize("classes", [37, 50, 1000])
def test_two_level_inverse_cdf_sampler_matches_the_distribution(classes):
    # 37 is prime (the class axis gets padded), 50 and 1000 split exactly.
    rng = np.random.default_rng(classes)
    probs = rng.dirichlet(np.full(classes, 0.3)).astype("float32")
    uniform = rng.uniform(size=(40_000,)).astype("float32")
    labels = estimators._sample_labels(
        np.broadcast_to(probs, (40_000, classes)), uniform
    )
    frequencies = np.bincount(np.asarray(labels), minlength=classes) / 40_000
    assert frequencies.shape == (classes,)
    # Binomial standard error is at most sqrt(p / 40000) <= 0.005.
    np.testing.assert_allclose(frequencies, probs, atol=0.012)


@pytest.mark.parametrize("from_logits", [True, False])
def test_gnb_cotangent_is_the_one_hot_formula(from_logits):
    # d CE / d y_pred at the sampled labels, term by term, times the
    # term's weight: for logits w * (softmax(z) - onehot(y)), for
    # probabilities -w * onehot(y) / p. Two leading axes, 7 classes,
    # weights with a zero (a masked term) and a fraction.
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(7), size=(2, 3)).astype("float32")
    labels = rng.integers(0, 7, size=(2, 3)).astype("int32")
    weights = np.array([[1.0, 0.0, 0.5], [1.0, 2.0, 0.0]], "float32")
    one_hot = np.eye(7, dtype="float32")[labels]
    if from_logits:
        expected = weights[..., None] * (probs - one_hot)
    else:
        expected = -weights[..., None] * one_hot / probs
    cotangent = estimators._sampled_ce_cotangent(
        probs, labels, weights, from_logits)
    np.testing.assert_allclose(cotangent, expected, rtol=1e-6, atol=1e-7)
    # Without weights every term counts once.
    unweighted = estimators._sampled_ce_cotangent(
        probs, labels, None, from_logits)
    expected = probs - one_hot if from_logits else -one_hot / probs
    np.testing.assert_allclose(unweighted, expected, rtol=1e-6, atol=1e-7)


def test_sampled_class_positions_stay_within_each_axis():
    # GPT-2's 50,257 classes and 50,000 terms (49 blocks of 1,024): a flat
    # index over the (terms, classes) logits would reach 2.5e9 > 2**31 and
    # wrap in int32 (JAX's int64 without x64). The positions the cotangent
    # scatters to are (term, class) pairs instead, built here from the
    # labels alone, without the 10 GB of logits.
    terms, classes = 50_000, 50_257
    assert terms * classes > 2**31
    labels = np.arange(terms, dtype="int32") * 7919 % classes
    positions = np.asarray(estimators._label_positions(labels))
    assert positions.dtype == np.int32
    np.testing.assert_array_equal(positions[:, 0], np.arange(terms))
    np.testing.assert_array_equal(positions[:, 1], labels)
    assert positions[:, 1].max() == classes - 1 and positions.min() == 0


@pytest.mark.filterwarnings("error:Explicitly requested dtype")
@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_fit_requests_no_dtype_that_jax_truncates(estimator):
    # JAX without x64 turns an int64 request into int32 with a warning
    # (and a wrapped value where it overflows); made an error here. On
    # TensorFlow nothing is truncated and the test passes as well.
    x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
    y = np.arange(16) % 3
    inputs = keras.Input((5,))
    model = SophiaModel(inputs, keras.layers.Dense(3)(inputs))
    model.compile(
        Sophia(seed=0, estimator=estimator, hessian_update_interval=2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 4
    assert np.asarray(model.optimizer.hessian_norm.numpy()) > 0


def refreshed_h(estimator, fraction=1.0, chunks=1, sample_weight=None):
    """h after one refresh step (step 0) of a small classifier, with the
    same weights, batch and seed whatever the chunking."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(6, activation="tanh")(inputs)
    model = SophiaModel(inputs, keras.layers.Dense(7)(hidden))
    model.compile(
        Sophia(1e-3, estimator=estimator, hessian_batch_fraction=fraction,
               hessian_chunks=chunks, seed=11),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 5)).astype("float32")
    y = rng.integers(0, 7, size=12)
    model.train_on_batch(x, y, sample_weight=sample_weight)
    return [v.numpy() for v in model.optimizer.variables
            if "hessian" in v.name]


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
@pytest.mark.parametrize("fraction, chunks", [(1.0, 4), (0.5, 3)])
def test_chunked_refresh_estimates_what_one_pass_does(
        estimator, fraction, chunks):
    # 4 chunks of 3 rows, or a half batch of 6 rows in 1 or 3 chunks,
    # against one pass over the same rows:
    # GNB samples the same labels (one draw over the share, cut into
    # chunks), Hutchinson uses one probe, and the statistics are summed
    # before the estimate. Only float summation order may differ.
    weights = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0] * 2, "float32")
    one_pass = refreshed_h(estimator, fraction if fraction == 1.0 else 1.0)
    if fraction != 1.0:
        # The half batch in one pass: chunks=1 over the share, compared
        # with its 4-chunk version below; first check it is not the whole
        # batch's estimate.
        one_pass = refreshed_h(estimator, fraction, 1)
        whole = refreshed_h(estimator)
        assert not np.allclose(one_pass[0], whole[0], rtol=1e-3)
    chunked = refreshed_h(estimator, fraction, chunks)
    for a, b in zip(one_pass, chunked):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-9)
    assert np.abs(one_pass[0]).sum() > 0
    if estimator == "gnb":
        # Masked terms are left out of every chunk's sums and counts.
        masked = refreshed_h(estimator, 1.0, 1, weights)
        for a, b in zip(masked, refreshed_h(estimator, 1.0, chunks, weights)):
            np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-9)


def test_chunks_that_do_not_divide_the_share_are_refused_by_name():
    with pytest.raises(ValueError, match=(
            r"`hessian_chunks` must divide the 6 examples.*"
            r"hessian_chunks=4")):
        refreshed_h("gnb", 0.5, 4)
