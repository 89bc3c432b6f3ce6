"""`keras.Model.fit` under `tf.distribute.MultiWorkerMirroredStrategy`."""

import tensorflow as tf

from keras_sophia import keras_internals


class MultiWorkerFit:
    """Mixin that lets `fit` and `evaluate` run under MultiWorkerMirrored.

    Put it before the Keras model class, for a model trained without
    `SophiaTrainStep`:

    ```python
    class MLP(keras_sophia.MultiWorkerFit, keras.Model):
        pass
    ```

    `SophiaTrainStep` already subclasses it, so a model with the Hessian
    refresh names that mixin alone (listing both makes Python refuse the
    class: no consistent method resolution order).

    It overrides `_maybe_symbolic_build`, `make_train_function` and
    `make_test_function` (not `train_step`). With two or more workers, Keras
    3 (3.15, `backend/tensorflow/trainer.py`) fails in two places before the
    first step completes; this fixes both:

    1. `_maybe_symbolic_build` all-reduces the first batch, a nest of
       per-replica values, with one `strategy.reduce` call. That call takes a
       single value; the collective all-reduce of several workers converts
       its argument to one tensor and fails ("Attempt to convert a value
       ({...PerReplica...}) to a Tensor"). The build needs only shapes and
       dtypes, so this mixin builds from this worker's first replica's part
       of the batch, and no collective runs at all.
    2. `reduce_per_replica(..., "auto")` reduces the step's logs with
       `strategy.reduce("MEAN", v, axis=0)` on several workers, which fails
       on the scalar losses and metrics ("Invalid reduction dimension 0 for
       input with 0 dimensions") and would average a vector metric over its
       own entries. This mixin gives each log value a leading axis of size
       one inside the replica, so that reduction averages over the replicas
       only and returns values of the original shapes: the replica average
       Keras takes for every other strategy.

    Without a strategy nothing changes; with one worker only the build
    changes, to the same shapes without the all-reduce. `predict` is as in
    Keras.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras reads a batch only under a strategy (otherwise it defers the
        # build), and `fit`/`evaluate` reset the iterator after this call.
        # `tf.nest` keeps each distributed value whole, as one leaf.
        if (iterator is not None
                and keras_internals.model_strategy(self) is not None):
            strategy = self.distribute_strategy
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: _first_local_part(v, strategy), next(batches)
                )
                break
        return keras_internals.symbolic_build(super(), data_batch)

    # Keras's own versions are `self._make_function(self.<kind>_step)`.
    def make_train_function(self, force=False):
        if self.train_function is None or force:
            self.train_function = keras_internals.make_function(
                self, self._replica_axis_logs(self.train_step))
        return self.train_function

    def make_test_function(self, force=False):
        if self.test_function is None or force:
            self.test_function = keras_internals.make_function(
                self, self._replica_axis_logs(self.test_step))
        return self.test_function

    def _replica_axis_logs(self, step):
        # The very test `reduce_per_replica` uses to pick its multi-worker
        # branch, so the axis is added exactly when that branch removes it.
        if not keras_internals.collective_all_reduce_multi_worker(
            self.distribute_strategy
        ):
            return step

        def step_with_replica_axis(data):
            logs = step(data)
            return tf.nest.map_structure(lambda v: tf.expand_dims(v, 0), logs)

        return step_with_replica_axis


def _first_local_part(value, strategy):
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value
