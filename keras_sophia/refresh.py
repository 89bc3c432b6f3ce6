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
        fraction = self.sophia.hessian_batch_fraction
        return gather(self.model, x, y, sample_weight,
                      self.sophia.estimator,
                      step_seed(self.sophia.seed, self.sophia.iterations),
                      fraction,
                      self.sophia.chunks_for(_slice_size(fraction, x)))

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
            zeros = [_zeros(self.variables[i].shape, self.sophia.iterations)
                     for i in kept]
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
           chunks=1, track_loss=True):
    """Forward pass, training gradient and `estimator`'s `(sums, count)`
    for this replica; `seed` (shape (2,)) seeds its draws.

    On the whole batch in one chunk the estimator shares the training
    pass: the inner tape records the forward pass (GNB differentiates the
    sampled loss through it), the outer one the training gradient
    (Hutchinson differentiates it once more); in a compiled step a tape
    costs nothing unless a gradient is taken from it. Otherwise the
    training pass is Keras's own, and the estimator then runs on the
    leading `fraction` of the batch in `chunks` consecutive chunks, each
    with a forward pass of its own, one after the other, so that at most
    one chunk's passes are alive at a time (see `_in_chunks`).
    """
    variables = model.trainable_weights
    # Undo loss scaling and Keras's 1 / replicas factor, so the
    # estimator sees this replica's own mean loss.
    scale = model.optimizer.scale_loss(1.0) if model.optimizer else 1.0
    scale = scale / tf.distribute.get_strategy().num_replicas_in_sync
    if fraction == 1.0 and chunks == 1:
        outer = tf.GradientTape(persistent=True)
        inner = tf.GradientTape(persistent=True)
        with outer:
            y_pred, loss = training_loss(model, x, y, sample_weight,
                                         inner, track_loss)
            grads = inner.gradient(loss, variables)
        context = EstimatorContext(model, x, y, sample_weight, y_pred,
                                   variables, grads, scale, inner, outer,
                                   seed)
        # After the training backward pass, not beside it: the graph
        # executor would otherwise run both at once and hold the
        # logits-sized tensors of each.
        with tf.control_dependencies(_flat(grads)):
            statistics = estimator.statistics(context)
        del inner, outer
        return y_pred, grads, statistics
    y_pred, grads = forward_backward(model, x, y, sample_weight,
                                     track_loss)
    statistics = _in_chunks(model, (x, y, sample_weight), grads, estimator,
                            seed, scale, fraction, chunks)
    return y_pred, grads, statistics


def _in_chunks(model, data, grads, estimator, seed, scale, fraction,
               chunks):
    """The estimator's `(sums, count)` over the Hessian share of `data` =
    (x, y, sample_weight), chunk after chunk.

    A `tf.while_loop` with one iteration at a time: neither the graph
    executor nor XLA (which drops control dependencies) may run two
    chunks, or a chunk beside the training backward pass, at once. The
    loop carries the training gradients for the second reason: it cannot
    start before they exist.
    """
    variables = model.trainable_weights
    share = _slice_size(fraction, data[0])
    # Which statistics the estimator leaves None (the loss does not
    # depend on the variable): known once the loop has traced its body,
    # which `tf.while_loop` does before it returns.
    missing = []

    def body(k, sums, count, ready):
        start, size = _chunk_rows(share, chunks, k)
        part = tf.nest.map_structure(
            lambda t: None if t is None else _slice_rows(t, start, size),
            data)
        chunk_sums, chunk_count = _chunk_statistics(
            model, part, estimator, seed, scale, (start, share))
        missing[:] = [c is None for c in chunk_sums]
        sums = [s if c is None else s + tf.cast(c, tf.float32)
                for s, c in zip(sums, chunk_sums)]
        return k + 1, sums, count + tf.cast(chunk_count, tf.float32), ready

    zeros = [_zeros(v.shape, seed[1]) for v in variables]
    with tf.control_dependencies(_flat(grads)):  # for the graph executor
        _, sums, count, _ = tf.while_loop(
            lambda k, *_: k < chunks, body,
            (tf.constant(0), zeros, tf.constant(0.0), _flat(grads)),
            parallel_iterations=1)
    return [None if m else s for m, s in zip(missing, sums)], count


def _chunk_statistics(model, part, estimator, seed, scale, rows):
    """The estimator's statistics on one chunk `part` = (x, y,
    sample_weight), from a forward pass of its own; `rows` = (first row,
    rows of the whole share) places the chunk's per-example draws."""
    variables = model.trainable_weights
    outer = tf.GradientTape(persistent=True)
    inner = tf.GradientTape(persistent=True)
    with outer:
        with inner:
            y_pred = model(part[0], training=True)

    # The chunk's own training gradient, built on first use (GNB never
    # asks): one backward pass through the chunk.
    def grads():
        with outer:
            _, loss = training_loss(model, *part, inner, False,
                                    y_pred=y_pred)
            return inner.gradient(loss, variables)

    context = EstimatorContext(model, *part, y_pred, variables, grads,
                               scale, inner, outer, seed, rows=rows)
    return estimator.statistics(context)


def forward_backward(model, x, y, sample_weight, track_loss=True):
    """The step's `(y_pred, grads)` as Keras's `train_step` computes them."""
    tape = tf.GradientTape()
    y_pred, loss = training_loss(model, x, y, sample_weight, tape,
                                 track_loss)
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


def _zeros(shape, known_at_run_time):
    """float32 zeros of `shape`, filled from an integer tensor whose value
    the graph only knows at run time. Grappler folds `tf.zeros` (and
    `zeros_like`, and `x * 0`) of a static shape into a constant, which
    the step's graph then holds between steps: one parameter-sized copy
    per variable beside AdamW's state (measured on the tiny GPT-2 in
    graph mode); `bitwise_and(x, 0)` it does not fold."""
    zero = tf.bitwise.bitwise_and(known_at_run_time, 0)
    return tf.fill(shape, tf.cast(zero, tf.float32))


def _flat(tensors):
    """The tensors of a list of gradients (IndexedSlices opened), for
    control dependencies."""
    return [t for t in tf.nest.flatten(tensors, expand_composites=True)
            if t is not None]


def _slice_size(fraction, x):
    """`max(1, floor(fraction * batch))`: the examples the Hessian is
    estimated on. Static where the batch size is (XLA wants static
    slices)."""
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    batch = first.shape[0]
    if batch is None:
        batch = tf.cast(tf.shape(first)[0], tf.float32)
        return tf.maximum(tf.cast(fraction * batch, tf.int32), 1)
    return max(int(fraction * batch), 1)


def _chunk_rows(share, chunks, k):
    """(first row, rows) of chunk `k` (a tensor) of the Hessian share:
    equal chunks where the share is static (`Sophia.chunks_for` divides
    it); a batch of unknown size (a graph-mode epoch's last batch) is cut
    into chunks that differ by at most one row."""
    if isinstance(share, int):
        return k * (share // chunks), share // chunks
    start = share * k // chunks
    return start, share * (k + 1) // chunks - start


def _slice_rows(tensor, start, size):
    """Rows `start:start + size` of `tensor`; static in shape where
    `size` is a Python int."""
    rank = len(tensor.shape)
    return tf.slice(tensor, [start] + [0] * (rank - 1),
                    tf.concat([[size], tf.shape(tensor)[1:]], 0))
