"""train.strategy: names to tf.distribute strategies."""

import pytest
import tensorflow as tf

from train import strategy as strategy_lib


def test_tpu_strategy_is_built_from_a_cluster_resolver(monkeypatch):
    # No TPU here: record that the resolver is made for the named TPU, the
    # cluster connected and the TPU system initialised before TPUStrategy.
    calls = []

    class Resolver:
        def __init__(self, tpu=None):
            calls.append(("resolver", tpu))

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver",
                        Resolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster",
                        lambda r: calls.append(("connect", type(r))))
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system",
                        lambda r: calls.append(("initialize", type(r))))
    monkeypatch.setattr(tf.distribute, "TPUStrategy",
                        lambda r: ("strategy", type(r)))
    built = strategy_lib.get_strategy("tpu", tpu="grpc://127.0.0.1:8470")
    assert calls == [("resolver", "grpc://127.0.0.1:8470"),
                     ("connect", Resolver), ("initialize", Resolver)]
    assert built == ("strategy", Resolver)


def test_default_and_unknown_names():
    assert strategy_lib.get_strategy() is tf.distribute.get_strategy()
    with pytest.raises(ValueError, match="must be one of"):
        strategy_lib.get_strategy("horovod")
