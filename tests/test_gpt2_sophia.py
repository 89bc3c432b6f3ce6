"""A tiny keras-hub GPT-2 trains with Sophia on the embedded corpus."""

import keras
import numpy as np
import pytest
from conftest import tiny_gpt2

import keras_sophia
from train.data import AUSTEN
from train.tokenizer import VOCAB_SIZE, gpt2_encoding


def austen_batches(steps, batch=8, block=32):
    """Consecutive (block + 1)-token windows of the corpus, as (x, y)."""
    text = AUSTEN.read_text(encoding="utf-8")[:200_000]
    ids = np.array(gpt2_encoding().encode_ordinary(text))
    windows = ids[: steps * batch * (block + 1)].reshape(-1, block + 1)
    x = {
        "token_ids": windows[:, :-1],
        "padding_mask": np.ones((len(windows), block), bool),
    }
    return x, windows[:, 1:]


# Large: the pretraining tests train this model on real tokens by default,
# and test_precision.py trains a byte-level one with both estimators.
@pytest.mark.large
@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_tiny_gpt2_loss_falls_with_sophia(estimator):
    model = tiny_gpt2(VOCAB_SIZE, 32)
    optimizer = keras_sophia.Sophia(
        learning_rate=2e-3, estimator=estimator, seed=0
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    x, y = austen_batches(steps=40)
    before = model.evaluate(x, y, batch_size=8, verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    after = model.evaluate(x, y, batch_size=8, verbose=0)

    # Uniform over 50,257 tokens is ln(50257) = 10.8; 40 steps at lr 2e-3
    # must get clearly below where training started.
    print(f"{estimator}: loss {before:.3f} -> {after:.3f}")
    assert after < before - 1.0
    assert int(optimizer.iterations.numpy()) == 40
    for v in model.trainable_variables + optimizer.variables:
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(v))), v.name
    hessian_norm = sum(
        float(np.sum(np.square(v.numpy())))
        for v in optimizer.variables
        if "hessian" in v.name
    )
    assert hessian_norm > 0
