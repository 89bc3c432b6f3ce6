"""One place that turns a strategy name into the backend's way of
training on several devices.

On TensorFlow a name is a `tf.distribute.Strategy`. On Keras's JAX
backend `mirrored` is a `keras.distribution.DataParallel` over every
device JAX sees (a machine's GPUs, or a TPU VM's cores) and `default`
one device; `multiworker` and `tpu` are TensorFlow's.
"""

import contextlib
import dataclasses
import typing

import keras
import tensorflow as tf

NAMES = ("default", "mirrored", "multiworker", "tpu")
JAX_NAMES = ("default", "mirrored")


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


@dataclasses.dataclass
class Devices:
    """What a training program needs of its devices, on either backend.

    scope: a context manager to build the model and optimizer in.
    replicas: how many devices share each global batch.
    chief: whether this process writes the run's files (under
        MultiWorkerMirroredStrategy only one worker does).
    distribute: takes a function of a `tf.distribute.InputContext` (None
        when there is none) returning the `tf.data.Dataset` of global
        batches (per-worker ones under multiworker), and returns what
        `fit` takes.
    """

    scope: typing.Callable
    replicas: int
    chief: bool
    distribute: typing.Callable


def devices(name="default", tpu=None):
    """The `Devices` of strategy `name` on Keras's current backend."""
    if keras.backend.backend() != "jax":
        strategy = get_strategy(name, tpu)
        return Devices(strategy.scope, strategy.num_replicas_in_sync,
                       strategy.extended.should_checkpoint,
                       strategy.distribute_datasets_from_function)
    if name not in JAX_NAMES:
        raise ValueError(
            f"Argument `strategy` must be one of {JAX_NAMES} on Keras's JAX "
            f"backend ('mirrored' spans every device JAX sees, a TPU's "
            f"cores included). Received: strategy={name!r}"
        )
    import jax

    # tf.data only reads and batches here; left alone, TensorFlow would
    # also claim the GPUs' memory that JAX needs. Once TensorFlow has
    # started (an earlier run in this process) the setting is fixed.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass
    replicas = 1
    if name == "mirrored":
        # Set for the whole process: `fit` shards each batch by the
        # distribution in force when it runs, not the one the model was
        # built under.
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        replicas = jax.device_count()
    return Devices(contextlib.nullcontext, replicas, jax.process_index() == 0,
                   lambda dataset_fn: dataset_fn(None))
