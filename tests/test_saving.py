"""A user's own model class that mixes in `SophiaTrainStep` reloads from
`.keras` with its Sophia compile: optimizer state, loss and metrics.

Backend-neutral: `.ci/run` runs this file on TensorFlow and on JAX."""

import keras
import keras_hub
import numpy as np
import pytest
from conftest import slot_values

import keras_sophia


# What a user writes: their own classes, registered so that the file
# names them. Neither is one of this repository's (models/gpt2.py's
# SophiaGPT2 or tests/common.py's SophiaModel).
@keras.saving.register_keras_serializable(package="user")
class UserGPT2(keras_sophia.SophiaTrainStep, keras_hub.models.GPT2CausalLM):
    pass


@keras.saving.register_keras_serializable(package="user")
class UserFunctional(keras_sophia.SophiaTrainStep, keras.Model):
    pass


def user_gpt2():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=11, num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, dropout=0.0, max_sequence_length=6)
    return UserGPT2(backbone=backbone, preprocessor=None)


def user_functional():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    return UserFunctional(inputs, keras.layers.Dense(11)(hidden))


def data(kind, n=48):
    rng = np.random.default_rng(1)
    if kind == "gpt2":
        ids = rng.integers(0, 11, size=(n, 7))
        x = {"token_ids": ids[:, :-1],
             "padding_mask": np.ones((n, 6), bool)}
        return x, ids[:, 1:]
    return rng.normal(size=(n, 5)).astype("float32"), rng.integers(0, 11, n)


@pytest.mark.parametrize("kind", ["gpt2", "functional"])
def test_user_subclass_reloads_with_its_sophia_compile(kind, tmp_path):
    model = user_gpt2() if kind == "gpt2" else user_functional()
    model.compile(
        optimizer=keras_sophia.Sophia(
            1e-2, hessian_update_interval=3, estimator="gnb", seed=5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()])
    x, y = data(kind)
    # 4 steps; the next refresh is at iterations = 6.
    model.fit(x, y, batch_size=12, epochs=1, verbose=0, shuffle=False)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")

    # Not keras-hub's default Adam at iteration 0: Sophia with its state.
    assert type(loaded) is type(model)
    assert isinstance(loaded.optimizer, keras_sophia.Sophia)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations.numpy()) == 4
    for kind_ in ("momentum", "hessian"):
        for a, b in zip(slot_values(model.optimizer, kind_),
                        slot_values(loaded.optimizer, kind_)):
            np.testing.assert_array_equal(a, b)
    assert isinstance(loaded.loss, keras.losses.SparseCategoricalCrossentropy)
    assert loaded.loss.get_config() == model.loss.get_config()
    # The same logs: loss and the saved metric, nothing of keras-hub's own.
    assert (loaded.evaluate(x, y, batch_size=12, verbose=0, return_dict=True)
            == model.evaluate(x, y, batch_size=12, verbose=0,
                              return_dict=True))

    # Four more steps cross the refresh at iterations = 6 identically.
    for m in (model, loaded):
        m.fit(x, y, batch_size=12, epochs=1, verbose=0, shuffle=False)
    assert int(loaded.optimizer.iterations.numpy()) == 8
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
