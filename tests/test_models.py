"""GPT-2 sizes on keras-hub, built from configs (no download)."""

import keras
import keras_hub
import numpy as np
import pytest

import keras_sophia
from models import gpt2
from train import pretrain


@pytest.mark.parametrize(
    "name, millions",
    # GPT-2 small / medium / large with the 50,257-token vocabulary and
    # 1,024 positions, the LM head tied to the token embedding.
    [("125m", 124.4), ("355m", 354.8),
     pytest.param("770m", 774.0, marks=pytest.mark.large)],
)
def test_named_sizes_have_gpt2_parameter_counts(name, millions):
    model = gpt2.build(name)
    assert abs(model.count_params() / 1e6 - millions) <= 0.03 * millions


@pytest.mark.parametrize("name, parameters", [
    # 4 x 12 * 64^2 (blocks) + 4 x 13 * 64 (biases and norms) + 2 * 64
    # (final norm) + 64 * (256 + 64) (token and position embeddings).
    ("byte-s", 4 * 12 * 64 ** 2 + 4 * 13 * 64 + 2 * 64 + 64 * (256 + 64)),
    ("byte-m", 6 * 12 * 128 ** 2 + 6 * 13 * 128 + 2 * 128
     + 128 * (256 + 64)),
])
def test_byte_level_sizes(name, parameters):
    model = gpt2.build(name, block_size=64, vocabulary_size=256)
    assert model.count_params() == parameters


def test_weight_decay_reaches_dense_kernels_only():
    # As the Sophia authors' GPT-2 (nanoGPT's Linear weights): not the
    # embeddings, biases (keras-hub's attention biases are 2-D) or norms.
    model = gpt2.build("byte-s", block_size=16, vocabulary_size=256)
    spared = pretrain.no_decay(model.trainable_variables)
    kept = {id(v) for v in spared}
    decayed = [v for v in model.trainable_variables if id(v) not in kept]
    assert {v.name for v in decayed} == {"kernel"}
    assert {v.name for v in spared} == {"embeddings", "bias", "gamma",
                                        "beta"}
    assert any(len(v.shape) == 2 for v in spared if v.name == "bias")
    # q, k, v, attention output, two MLP layers in each of 4 blocks.
    assert len(decayed) == 4 * 6


def test_tiny_forward_pass_gives_next_token_logits():
    model = gpt2.build("tiny", block_size=16)
    x = {
        "token_ids": np.arange(32).reshape(2, 16),
        "padding_mask": np.ones((2, 16), bool),
    }
    logits = model(x)
    assert logits.shape == (2, 16, 50257)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_no_dropout_as_in_the_paper():
    assert gpt2.build("tiny").backbone.get_config()["dropout"] == 0.0


def test_unknown_size_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="125m"):
        gpt2.build("gpt5")


def test_keras_file_reloads_with_sophia_and_its_state(tmp_path):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, dropout=0.0, max_sequence_length=16,
    )
    model = gpt2.SophiaGPT2(backbone=backbone, preprocessor=None)
    model.compile(
        keras_sophia.Sophia(1e-2, rho=0.07, seed=1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    tokens = np.random.default_rng(0).integers(0, 64, size=(8, 17))
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((8, 16), bool)}
    # keras-hub makes a tf.data pipeline of the arrays, which Keras would
    # not shuffle anyway (and says so).
    model.fit(x, tokens[:, 1:], batch_size=4, verbose=0, shuffle=False)
    model.save(tmp_path / "gpt2.keras")

    loaded = keras.saving.load_model(tmp_path / "gpt2.keras")
    # keras-hub alone would come back compiled with Adam, state dropped.
    assert isinstance(loaded.optimizer, keras_sophia.Sophia)
    assert loaded.optimizer.rho == 0.07
    assert int(loaded.optimizer.iterations.numpy()) == 2
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
