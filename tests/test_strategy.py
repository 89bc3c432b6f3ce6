"""train.strategy: names to tf.distribute strategies."""

import pytest
import tensorflow as tf

from train import strategy as strategy_lib


def test_tpu_strategy_is_built_on_a_connected_initialised_tpu(monkeypatch):
    # No TPU here, so a fake one that enforces TensorFlow's order: a
    # TPUStrategy needs the TPU system initialised, which needs the
    # cluster connected, all through the one resolver of the named TPU.
    class Resolver:
        def __init__(self, tpu=None):
            self.tpu = tpu
            self.connected = self.initialized = False

    resolvers = []

    def make_resolver(tpu=None):
        resolvers.append(Resolver(tpu))
        return resolvers[-1]

    def connect(resolver):
        resolver.connected = True

    def initialize(resolver):
        assert resolver.connected, "TPU system initialised before connect"
        resolver.initialized = True

    class Strategy:
        def __init__(self, resolver):
            assert resolver.initialized, "strategy made before initialise"
            self.resolver = resolver

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver",
                        make_resolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster",
                        connect)
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system",
                        initialize)
    monkeypatch.setattr(tf.distribute, "TPUStrategy", Strategy)
    built = strategy_lib.get_strategy("tpu", tpu="grpc://127.0.0.1:8470")
    assert isinstance(built, Strategy)
    [resolver] = resolvers
    assert resolver.tpu == "grpc://127.0.0.1:8470"
    assert built.resolver is resolver
    # `tpu=None` lets the resolver find the local TPU.
    assert strategy_lib.get_strategy("tpu").resolver.tpu is None


def test_default_and_unknown_names():
    assert strategy_lib.get_strategy() is tf.distribute.get_strategy()
    with pytest.raises(ValueError, match="must be one of"):
        strategy_lib.get_strategy("horovod")
