"""Sparse gradients: an embedding lookup's gradient is `tf.IndexedSlices`.

Sophia's update is dense (m, h and weight decay act on every row), so a
sparse gradient must update exactly as its dense form, zeros in the rows it
does not hold; and the Hessian estimates must not depend on whether the
training gradient of a table came out sparse.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import CE
from conftest import SophiaModel, slot_values

import keras_sophia

VOCAB, LENGTH, WIDTH, CLASSES = 20, 6, 4, 5


def sparse_and_dense(values, indices, rows):
    """An IndexedSlices gradient and its dense form (duplicates summed)."""
    values = tf.constant(values, tf.float32)
    sparse = tf.IndexedSlices(
        values, tf.constant(indices), tf.constant((rows, values.shape[1]))
    )
    return sparse, tf.convert_to_tensor(sparse)


@pytest.mark.parametrize("weight_decay", [None, 0.1])
def test_sparse_gradient_updates_like_its_dense_form(weight_decay):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(6, 3)).astype("float32")
    # h = (1 - beta_2) * estimate, in [0.001, 0.1]; with rho = 1 that is
    # the denominator, around |m| = 0.035 |g|: of the 18 nonzero |m| / h
    # of the two steps 7 exceed 1 (clipped) and 11 do not.
    estimate = rng.uniform(0.1, 10.0, size=(6, 3)).astype("float32")
    # Row 2 twice in the first gradient (summed); row 0 only in the first.
    grads = [
        sparse_and_dense(rng.normal(size=(len(rows), 3)), rows, 6)
        for rows in ([0, 2, 2], [4, 1])
    ]
    results = []
    for form in (0, 1):  # sparse, dense
        variable = keras.Variable(start)
        optimizer = keras_sophia.Sophia(
            0.1, rho=1.0, weight_decay=weight_decay, seed=0
        )
        optimizer.update_hessian([estimate], [variable])
        for grad in grads:
            before = variable.numpy()
            optimizer.apply([grad[form]], [variable])
        # Row 0, absent from the last gradient, still moved: m decays.
        assert not np.array_equal(before[0], variable.numpy()[0])
        results.append(
            [variable.numpy()]
            + slot_values(optimizer, "momentum")
            + slot_values(optimizer, "hessian")
        )
    for a, b in zip(*results):
        # Summing duplicate rows before or after scaling by 1 - beta_1 can
        # differ in the last bit.
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


class OneHotEmbedding(keras.layers.Layer):
    """`one_hot(ids) @ table`: an embedding whose gradient is dense."""

    def __init__(self, input_dim, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.input_dim, self.output_dim = input_dim, output_dim

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=(self.input_dim, self.output_dim), name="embeddings"
        )

    def call(self, ids):
        one_hot = keras.ops.one_hot(ids, self.input_dim, dtype=self.dtype)
        return keras.ops.matmul(one_hot, self.embeddings)


def embedding_classifier(embedding, estimator="gnb"):
    """ids (batch, LENGTH) -> table -> tanh layer -> CLASSES logits."""
    ids = keras.Input((LENGTH,), dtype="int32")
    hidden = keras.layers.Flatten()(embedding(ids))
    hidden = keras.layers.Dense(8, activation="tanh")(hidden)
    model = SophiaModel(ids, keras.layers.Dense(CLASSES)(hidden))
    model.compile(
        keras_sophia.Sophia(
            1e-2, hessian_update_interval=2, estimator=estimator, seed=0
        ),
        CE,
    )
    return model


def token_data(n=16, seed=0):
    """Ids below VOCAB - 4, so the table's last 4 rows get no gradient."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB - 4, size=(n, LENGTH)).astype("int32")
    return x, rng.integers(0, CLASSES, size=(n,))


def training_gradients(model, x, y):
    with tf.GradientTape() as tape:
        loss = CE(y, model(x, training=True))
    return tape.gradient(loss, model.trainable_variables)


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_embedding_estimates_equal_one_hot_estimates(estimator):
    x, y = token_data()
    sparse = embedding_classifier(keras.layers.Embedding(VOCAB, WIDTH))
    dense = embedding_classifier(OneHotEmbedding(VOCAB, WIDTH))
    dense.set_weights(sparse.get_weights())
    assert isinstance(training_gradients(sparse, x, y)[0], tf.IndexedSlices)
    assert not isinstance(training_gradients(dense, x, y)[0], tf.IndexedSlices)

    # Same variables in the same order with the same shapes: the same
    # draws (one per variable for Hutchinson's probes, one per term for
    # GNB's labels), so the estimates agree up to rounding.
    estimates = [
        keras_sophia.estimate_hessian(m, x, y, estimator=estimator, seed=7)
        for m in (sparse, dense)
    ]
    for a, b in zip(*estimates):
        # The table's gradient rows are summed in another order: measured
        # differences 6e-8 at most, on estimates up to 0.8.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert np.any(estimates[0][0].numpy() != 0)


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_fit_refreshes_an_embedding_model(estimator):
    x, y = token_data()
    model = embedding_classifier(
        keras.layers.Embedding(VOCAB, WIDTH), estimator=estimator
    )
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)

    optimizer = model.optimizer
    assert int(optimizer.iterations.numpy()) == 4
    table = slot_values(optimizer, "hessian")[0]
    assert np.all(np.isfinite(table))
    # Refreshes at steps 0 and 2 saw ids below VOCAB - 4 only: the H rows
    # of the other ids are exactly 0, so are their estimates.
    np.testing.assert_array_equal(table[VOCAB - 4 :], 0.0)
    assert np.any(table[: VOCAB - 4] != 0)
