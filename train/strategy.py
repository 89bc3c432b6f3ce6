"""One place that turns a strategy name into a `tf.distribute.Strategy`."""

import tensorflow as tf

NAMES = ("default", "mirrored", "multiworker", "tpu")


def get_strategy(name="default", tpu=None):
    """`default` (one device), `mirrored` (all local GPUs, or CPUs),
    `multiworker` (one process per host, configured by `TF_CONFIG`) or
    `tpu` (via `TPUClusterResolver`; `tpu` names the TPU, `None` finds the
    local one). Build the model and optimizer inside `strategy.scope()`."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(
        f"Argument `strategy` must be one of {NAMES}. Received: "
        f"strategy={name!r}"
    )
