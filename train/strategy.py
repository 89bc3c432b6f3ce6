"""One place that turns a strategy name into the backend's way of
training on several devices.

On TensorFlow a name is a `tf.distribute.Strategy`. On Keras's JAX
backend `mirrored` is a `keras.distribution.DataParallel` over every
device JAX sees (a machine's GPUs, or a TPU VM's cores) and `default`
one device; `multiworker` and `tpu` are TensorFlow's. On torch, where
Keras offers no distribution, only `default` (one device).
"""

import contextlib
import dataclasses
import typing

import keras
import tensorflow as tf

NAMES = ("default", "mirrored", "multiworker", "tpu")
# The names each Keras backend runs.
BACKEND_NAMES = {"tensorflow": NAMES, "jax": ("default", "mirrored"),
                 "torch": ("default",)}


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
    backend = keras.backend.backend()
    if backend == "tensorflow":
        strategy = get_strategy(name, tpu)
        return Devices(strategy.scope, strategy.num_replicas_in_sync,
                       strategy.extended.should_checkpoint,
                       strategy.distribute_datasets_from_function)
    if name not in BACKEND_NAMES[backend]:
        raise ValueError(
            f"Argument `strategy` must be one of {BACKEND_NAMES[backend]} "
            f"on Keras's {backend} backend (on JAX 'mirrored' spans every "
            "device JAX sees, a TPU's cores included; Keras offers no "
            f"distribution on torch). Received: strategy={name!r}"
        )
    # tf.data only reads and batches here; left alone, TensorFlow would
    # also claim the GPUs' memory that JAX or torch needs. Once TensorFlow
    # has started (an earlier run in this process) the setting is fixed.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass
    if backend == "torch":
        return Devices(contextlib.nullcontext, 1, True,
                       lambda dataset_fn: dataset_fn(None))
    import jax

    replicas = 1
    if name == "mirrored":
        # Set for the whole process: `fit` shards each batch by the
        # distribution in force when it runs, not the one the model was
        # built under.
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        replicas = jax.device_count()
    return Devices(contextlib.nullcontext, replicas, jax.process_index() == 0,
                   lambda dataset_fn: dataset_fn(None))
