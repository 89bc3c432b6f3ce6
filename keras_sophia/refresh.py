"""One Hessian refresh, from the decision to the new `h` (TensorFlow).

`HessianRefresh` runs the training forward and backward pass of a step
and, on refresh steps, the five stages of a refresh:

1. decide: `Sophia.should_refresh_hessian()`, read from `iterations`
   inside the compiled step;
2. gather: the estimator's `(sums, count)` for this replica's batch,
   from an `EstimatorContext` that shares the training pass;
3. combine: sums and counts added over the replicas (on one replica
   there is nothing to add);
4. check: a NaN or Inf in any replica's gradient or statistics leaves `h`
   alone and counts the refresh in `skipped_refreshes` (under float16 loss
   scaling the step overflowed: `LossScaleOptimizer` skips it, and the EMA
   would keep a bad estimate for good);
5. update: `estimator.finalize(totals, count)` into
   `Sophia.update_hessian`, on every replica's copy of `h`.

Stages 4 and 5 are `_commit`, the one place `h` changes. On several
replicas the combine is a cross-replica sum, which TensorFlow refuses
inside the `tf.cond` that selects refresh steps in replica context; so
there each replica gathers under the cond (zeros on other steps), one
unconditional `merge_call` enters cross-replica context, and a cond there
wraps the sum and `_commit`: the all-reduce runs on refresh steps only.
"""

import inspect

import tensorflow as tf

from keras_sophia import keras_internals
from keras_sophia.context import EstimatorContext


class HessianRefresh:
    """The Hessian refresh of `model`'s train step, for its optimizer
    `sophia` (a `Sophia`, possibly inside a `LossScaleOptimizer`)."""

    def __init__(self, model, sophia):
        self.model = model
        self.sophia = sophia
        self.variables = model.trainable_weights

    def __call__(self, x, y, sample_weight, replica):
        """The step's `(y_pred, grads)`; on refresh steps also updates `h`.
        `replica` is the replica context on several replicas, else None.
        Returns the refresh flag too, for the diagnostics after `apply`."""
        # The schedule is read from `iterations` inside the compiled step;
        # a Python counter would be frozen when the step is traced.
        is_refresh = self.sophia.should_refresh_hessian()

        def ordinary():
            return forward_backward(self.model, x, y, sample_weight)

        if replica is None:
            def refresh():
                y_pred, grads, (sums, count) = self._gather(
                    x, y, sample_weight)
                self._commit(sums, count, all_finite(grads + sums))
                return y_pred, grads

            y_pred, grads = tf.cond(is_refresh, refresh, ordinary)
        else:
            y_pred, grads = self._across(replica, is_refresh, ordinary,
                                         x, y, sample_weight)
        return y_pred, grads, is_refresh

    def _gather(self, x, y, sample_weight):
        return gather(self.model, x, y, sample_weight,
                      self.sophia.estimator,
                      step_seed(self.sophia.seed, self.sophia.iterations),
                      self.sophia.hessian_batch_fraction)

    def _commit(self, sums, count, finite, on_each_replica=None):
        """Checks and updates `h` from the combined statistics (see the
        module docstring); `on_each_replica(fn, *args)` runs the update on
        every replica's copy (default: here)."""
        run = on_each_replica or (lambda fn, *args: fn(*args))

        def update(sums, count):
            estimates = self.sophia.estimator.finalize(sums, count)
            self.sophia.update_hessian(estimates, self.variables)

        tf.cond(finite, lambda: run(update, sums, count),
                self.sophia.count_skipped_refresh)

    def _across(self, replica, is_refresh, ordinary, x, y, sample_weight):
        # Which statistics reach an `h` slot is known only once the
        # estimator is traced; tf.cond traces the refresh branch first, and
        # the other branch and the merge read the list after it.
        kept = []

        def refresh():
            y_pred, grads, (sums, count) = self._gather(x, y, sample_weight)
            kept.extend(
                i for i, (s, v) in enumerate(zip(sums, self.variables))
                if s is not None and self.sophia.hessian_slot(v) is not None)
            # 1 where this replica's pass overflowed (fp16) or went NaN.
            broken = 1.0 - tf.cast(all_finite(grads + sums), tf.float32)
            return (y_pred, grads, [tf.cast(sums[i], tf.float32)
                                    for i in kept],
                    tf.cast(count, tf.float32), broken)

        def other():
            y_pred, grads = ordinary()
            zeros = [tf.zeros(self.variables[i].shape) for i in kept]
            return y_pred, grads, zeros, tf.constant(0.0), tf.constant(0.0)

        y_pred, grads, sums, count, broken = tf.cond(is_refresh, refresh,
                                                     other)
        slots = [self.sophia.hessian_slot(self.variables[i]).value
                 for i in kept]

        def combine(strategy, is_refresh, sums, count, broken):
            def sum_and_commit():
                totals = strategy.extended.batch_reduce_to(
                    tf.distribute.ReduceOp.SUM,
                    list(zip(sums, slots)) + [(count, slots[0]),
                                              (broken, slots[0])])
                full = [None] * len(self.variables)
                for i, total in zip(kept, totals):
                    full[i] = total
                self._commit(
                    full, totals[-2],
                    strategy.experimental_local_results(totals[-1])[0] == 0,
                    lambda fn, *args: strategy.extended.call_for_each_replica(
                        fn, args=args))

            if slots:
                # Every replica holds the same flag (it comes from
                # iterations).
                tf.cond(strategy.experimental_local_results(is_refresh)[0],
                        sum_and_commit, lambda: None)

        replica.merge_call(combine, args=(is_refresh, sums, count, broken))
        return y_pred, grads


def gather(model, x, y, sample_weight, estimator, seed, fraction=1.0,
           track_loss=True):
    """Forward pass, training gradient and `estimator`'s `(sums, count)`
    for this replica, sharing one pass; `seed` (shape (2,)) seeds its draws.

    Below a `fraction` of 1 the model is called on the leading slice and on
    the rest separately and the outputs joined, so the estimator's passes
    run through the slice only (a layer that normalizes over the batch sees
    two batches on refresh steps). The inner tape records the forward pass
    (GNB differentiates the sampled loss through it); the outer tape
    records the training gradient (Hutchinson differentiates it once more).
    In a compiled step a tape costs nothing unless a gradient is taken
    from it.
    """
    variables = model.trainable_weights
    size = _slice_size(fraction, x)
    outer = tf.GradientTape(persistent=True)
    inner = tf.GradientTape(persistent=True)
    with outer:
        if size is None:
            y_pred, loss = training_loss(model, x, y, sample_weight,
                                         inner, track_loss)
            part = x, y, sample_weight, y_pred
        else:
            head, tail = _split(size, x)
            with inner:
                head_pred = model(head, training=True)
                y_pred = tf.nest.map_structure(
                    lambda a, b: tf.concat([a, b], 0), head_pred,
                    model(tail, training=True))
            _, loss = training_loss(model, x, y, sample_weight, inner,
                                    track_loss, y_pred=y_pred)
            part = _split(size, (x, y, sample_weight))[0] + (head_pred,)
        grads = inner.gradient(loss, variables)
    # Undo loss scaling and Keras's 1 / replicas factor, so the
    # estimator sees this replica's own mean loss.
    scale = model.optimizer.scale_loss(1.0) if model.optimizer else 1.0
    scale = scale / tf.distribute.get_strategy().num_replicas_in_sync
    if size is None:
        estimator_grads = grads
    else:
        # The slice's own training gradient, built on first use (GNB
        # never asks): one backward pass through the slice.
        def estimator_grads():
            with outer:
                _, part_loss = training_loss(
                    model, *part[:3], inner, False, y_pred=part[3])
                return inner.gradient(part_loss, variables)
    context = EstimatorContext(model, *part, variables, estimator_grads,
                               scale, inner, outer, seed)
    # After the training backward pass, not beside it: the graph executor
    # would otherwise run both at once and hold the logits-sized tensors
    # of each (for GNB on the tiny GPT-2, 1.7 times the peak bytes).
    done = [g for g in tf.nest.flatten(grads, expand_composites=True)
            if g is not None]
    with tf.control_dependencies(done):
        statistics = estimator.statistics(context)
    del inner, outer
    return y_pred, grads, statistics


def forward_backward(model, x, y, sample_weight):
    """The step's `(y_pred, grads)` as Keras's `train_step` computes them."""
    tape = tf.GradientTape()
    y_pred, loss = training_loss(model, x, y, sample_weight, tape)
    return y_pred, tape.gradient(loss, model.trainable_weights)


def training_loss(model, x, y, sample_weight, tape, track_loss=True,
                  y_pred=None):
    """Keras's forward pass (unless `y_pred` is given) and scaled loss,
    recorded on `tape`, as `TensorFlowTrainer.train_step` computes them, so
    a step through the mixin has Keras's loss, metrics and loss scaling."""
    with tape:
        if y_pred is None:
            y_pred = model(x, training=True)
        loss = _compute_loss(model, x, y, sample_weight, y_pred)
        if track_loss:
            keras_internals.track_loss(model, loss, x)
        if model.optimizer is not None:
            loss = model.optimizer.scale_loss(loss)
    return y_pred, loss


def _compute_loss(model, x, y, sample_weight, y_pred):
    """`model.compute_loss` in training mode; overrides written before
    Keras 3.3 take no `training` argument (Keras's own step allows them)."""
    kwargs = dict(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
    if "training" in inspect.signature(model.compute_loss).parameters:
        kwargs["training"] = True
    return model.compute_loss(**kwargs)


def all_finite(tensors):
    """Whether every entry of every tensor (or IndexedSlices) is finite."""
    return tf.reduce_all([
        tf.reduce_all(tf.math.is_finite(
            t.values if isinstance(t, tf.IndexedSlices) else t))
        for t in tensors if t is not None
    ])


def step_seed(seed, iterations):
    """Stateless seed (2,) from the optimizer seed and the step counter."""
    return tf.stack(
        [tf.constant(seed, tf.int64), tf.cast(iterations, tf.int64)])


def _slice_size(fraction, x):
    """`max(1, floor(fraction * batch))`, or None for the whole batch.
    Static where the batch size is (XLA wants static slices)."""
    if fraction == 1.0:
        return None
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    batch = first.shape[0]
    if batch is None:
        batch = tf.cast(tf.shape(first)[0], tf.float32)
        return tf.maximum(tf.cast(fraction * batch, tf.int32), 1)
    return max(int(fraction * batch), 1)


def _split(size, data):
    """(the first `size` examples of every tensor in `data`, the rest)."""
    return tuple(
        tf.nest.map_structure(lambda t: None if t is None else t[part],
                              data)
        for part in (slice(None, size), slice(size, None)))
