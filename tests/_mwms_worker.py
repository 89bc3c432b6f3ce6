"""One worker of `test_multiworker.py`: `fit` under MultiWorkerMirrored.

`python _mwms_worker.py OPTIMIZER INPUT OUT`, with TF_CONFIG naming the
cluster and this worker, trains a tiny classifier (validating on the
training rows) and saves its weights, optimizer variables and History to OUT (`.npz`). The test imports the
same builders for its single-process reference.
"""

import sys

import keras
import numpy as np
import tensorflow as tf

import keras_sophia
from keras_sophia.multiworker import MultiWorkerFit

GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 3
EPOCHS = 2


class Model(MultiWorkerFit, keras.Model):
    """Keras's own train step."""


class SophiaModel(keras_sophia.SophiaTrainStep, keras.Model):
    """The Hessian-refreshing train step (which includes MultiWorkerFit)."""


def fix_draws():
    """Every estimator draw is 0.25 (Hutchinson probes all -1, GNB labels at
    the CDF's first quartile), so the workers' Sophia run can be compared
    with one process; that replicas draw their own numbers is tested in
    test_distributed.py."""
    keras_sophia.EstimatorContext.uniform = (
        lambda self, shape, per_example=False: tf.fill(shape, 0.25)
    )


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS_PER_EPOCH, 5)).astype("float32")
    return x, rng.integers(0, 3, size=(len(x),))


def build(optimizer):
    keras.utils.set_random_seed(0)  # the same initial weights everywhere
    optimizer, model_class = {
        "sgd": (keras.optimizers.SGD(0.1, momentum=0.9), Model),
        "adamw": (keras.optimizers.AdamW(0.01), Model),
        "sophia-h": (
            keras_sophia.Sophia(
                learning_rate=0.01, estimator="hutchinson",
                hessian_update_interval=2, seed=1,
            ),
            SophiaModel,
        ),
        # A clip norm far below the gradient norm: it must act on the
        # gradient averaged over both workers.
        "sophia-g": (
            keras_sophia.Sophia(
                learning_rate=0.01, hessian_update_interval=2, seed=1,
                global_clipnorm=1e-3,
            ),
            SophiaModel,
        ),
    }[optimizer]
    x = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh")(x)
    model = model_class(x, keras.layers.Dense(3)(h))
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def results(model, history):
    """Weights, optimizer variables and History as named arrays."""
    arrays = {f"weight:{i}": w for i, w in enumerate(model.get_weights())}
    for i, v in enumerate(model.optimizer.variables):
        arrays[f"optimizer:{i}:{v.name}"] = v.numpy()
    for key, values in history.history.items():
        arrays[f"history:{key}"] = np.array(values)
    return arrays


def batched():
    """The rows in global batches, for `fit` to distribute.

    `fit` splits every global batch in per-replica halves and each worker
    keeps its own (DATA sharding; AUTO would first try files and warn).
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    rows = tf.data.Dataset.from_tensor_slices(data())
    return rows.batch(GLOBAL_BATCH).with_options(options)


def distributed_input(strategy, kind):
    """Either way, global batch k is rows 16k..16k+15, half per worker."""
    if kind == "dataset":
        return batched()

    def dataset_fn(context):
        # Worker i reads rows i, i+2, ...
        rows = tf.data.Dataset.from_tensor_slices(data())
        return rows.shard(
            context.num_input_pipelines, context.input_pipeline_id
        ).batch(context.get_per_replica_batch_size(GLOBAL_BATCH))

    return strategy.distribute_datasets_from_function(dataset_fn)


def main(optimizer, input_kind, out):
    if optimizer.startswith("sophia"):
        fix_draws()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build(optimizer)
    # Validation runs `evaluate`'s step under the strategy as well.
    history = model.fit(
        distributed_input(strategy, input_kind), epochs=EPOCHS,
        validation_data=batched(), verbose=0,
    )
    np.savez(out, **results(model, history))


if __name__ == "__main__":
    main(*sys.argv[1:])
