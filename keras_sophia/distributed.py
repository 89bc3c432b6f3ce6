"""What `SophiaTrainStep` does differently when a step runs on several
replicas (`MirroredStrategy`, `MultiWorkerMirroredStrategy`).

Stock Keras all-reduces the gradients inside `optimizer.apply`, *after*
clipping and after `LossScaleOptimizer`'s finite check, so both act on one
replica's gradient. Here the gradients are all-reduced first (one sum, the
same traffic as Keras), the optimizer is told not to reduce them again, and
clipping, the finite check and the update all see the global gradient, which
is identical on every replica.

The Hessian refresh cannot synchronize inside the `tf.cond` that selects
refresh steps (TensorFlow refuses `merge_call` in replica-context control
flow), so each replica computes its estimator statistics under the cond
(zeros on ordinary steps), one unconditional `merge_call` enters
cross-replica context, and the cond there wraps the reduction and the
update of `h`: the all-reduce runs on refresh steps only.
"""

import contextlib
import threading

import tensorflow as tf


def replica_context():
    """The replica context when a step runs on more than one replica."""
    if tf.distribute.get_strategy().num_replicas_in_sync < 2:
        return None
    return tf.distribute.get_replica_context()


def check_compile_options(model):
    """Refuses what stock Keras cannot run on several local replicas.

    `jit_compile=True` compiles `strategy.run` over all devices into one
    XLA program, which then reads other devices' variables; with
    `steps_per_execution > 1` Keras's step loop feeds distributed inputs
    through an optional inside `tf.while_loop`, which fails with a
    placeholder error. Both fail for plain AdamW too. TPUStrategy has its
    own compiler path and is not affected.
    """
    strategy = model.distribute_strategy
    if strategy.num_replicas_in_sync < 2 or isinstance(
        strategy, tf.distribute.TPUStrategy
    ):
        return
    for name, value, fix in (
        ("jit_compile", model.jit_compile is True,
         ("compile with jit_compile=False (Keras's default under "
          "tf.distribute)")),
        ("steps_per_execution", model.steps_per_execution > 1,
         "compile with steps_per_execution=1"),
    ):
        if value:
            raise ValueError(
                f"`{name}` is not supported by Keras with "
                f"{type(strategy).__name__} over "
                f"{strategy.num_replicas_in_sync} replicas (it fails even "
                f"for plain AdamW): {fix}. Received: "
                f"{name}={getattr(model, name)!r}"
            )


def check_optimizer(optimizer):
    """Refuses optimizer options that cannot run across replicas."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    for name, value in (
        ("gradient_accumulation_steps", inner.gradient_accumulation_steps),
        ("ema_overwrite_frequency", inner.ema_overwrite_frequency),
    ):
        if value:
            raise ValueError(
                f"`{name}={value}` cannot be used with more than one replica: "
                "Keras synchronizes replicas inside a conditional for it, "
                "which tf.distribute does not allow. Drop the argument, or "
                "for accumulation raise the global batch size instead "
                f"(optimizer: {inner.name})."
            )


def all_reduce_gradients(replica, grads):
    """Sums the gradients over replicas (Keras scales each replica's loss by
    1 / replicas, so the sum is the gradient of the global mean loss)."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    reduced = iter(replica.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if g is None else next(reduced) for g in grads]


# Per thread: MirroredStrategy traces each replica's step in its own thread.
_tracing = threading.local()


@contextlib.contextmanager
def gradients_already_reduced(optimizer):
    """Within: `optimizer.apply`, traced by this replica, skips its own
    all-reduce. Outside (a user's own `apply`) it still reduces."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if "_all_reduce_sum_gradients" not in vars(inner):
        reduce = inner._all_reduce_sum_gradients

        def reduce_unless_done(grads_and_vars):
            if getattr(_tracing, "reduced", False):
                return list(grads_and_vars)
            return reduce(grads_and_vars)

        inner._all_reduce_sum_gradients = reduce_unless_done
    _tracing.reduced = True
    try:
        yield
    finally:
        _tracing.reduced = False


def apply(replica, optimizer, grads, variables):
    """`optimizer.apply`, told on several replicas that `grads` are
    already reduced."""
    if replica is None:
        optimizer.apply(grads, variables)
        return
    with gradients_already_reduced(optimizer):
        optimizer.apply(grads, variables)


def apply_if(condition, replica, optimizer, grads, variables):
    """`optimizer.apply` when `condition` (the same on every replica)
    holds. `apply` synchronizes, which replica context refuses inside a
    `tf.cond`, so on several replicas the cond runs in cross-replica
    context around a per-replica `apply`, as Keras's LossScaleOptimizer
    does."""
    if replica is None:
        tf.cond(condition, lambda: optimizer.apply(grads, variables),
                lambda: None)
        return

    def on_each_replica(grads):
        # Runs in a new thread per replica, which sets its own flag.
        apply(replica, optimizer, grads, variables)

    def decide(strategy, condition, grads):
        tf.cond(
            strategy.experimental_local_results(condition)[0],
            lambda: strategy.extended.call_for_each_replica(
                on_each_replica, args=(grads,)
            ),
            lambda: None,
        )

    replica.merge_call(decide, args=(condition, grads))


def refresh_across_replicas(replica, sophia, is_refresh, refresh, ordinary,
                            variables):
    """`tf.cond(is_refresh, refresh, ordinary)` plus the cross-replica `h`
    update. `refresh()` returns `(y_pred, grads, (sums, count))`,
    `ordinary()` returns `(y_pred, grads)`; returns `(y_pred, grads)`."""
    # Indices whose estimate reaches an h slot; found while tracing the
    # refresh branch, which tf.cond traces before the ordinary one.
    kept = []

    def refresh_branch():
        y_pred, grads, (sums, count) = refresh()
        kept.extend(
            i for i, (s, v) in enumerate(zip(sums, variables))
            if s is not None and sophia.hessian_slot(v) is not None
        )
        # 1 where this replica's pass overflowed (fp16) or went NaN.
        broken = 1.0 - tf.cast(all_finite(grads + sums), tf.float32)
        return (y_pred, grads, [tf.cast(sums[i], tf.float32) for i in kept],
                tf.cast(count, tf.float32), broken)

    def ordinary_branch():
        y_pred, grads = ordinary()
        zeros = [tf.zeros(variables[i].shape, tf.float32) for i in kept]
        return y_pred, grads, zeros, tf.constant(0.0), tf.constant(0.0)

    y_pred, grads, sums, count, broken = tf.cond(
        is_refresh, refresh_branch, ordinary_branch
    )
    slots = [sophia.hessian_slot(variables[i]).value for i in kept]

    def update(strategy, is_refresh, sums, count, broken):
        def reduce_and_update():
            # Sums and counts add up over replicas; the estimator turns the
            # totals into the estimate (GNB squares only after the sum).
            totals = strategy.extended.batch_reduce_to(
                tf.distribute.ReduceOp.SUM,
                list(zip(sums, slots)) + [(count, slots[0]),
                                          (broken, slots[0])],
            )
            # As on one device: a pass that overflowed on any replica (the
            # loss-scale optimizer skips that step) leaves h alone, and
            # since iterations does not advance the next batch refreshes.
            tf.cond(
                strategy.experimental_local_results(totals[-1])[0] == 0,
                lambda: assign_all(totals[:-2], totals[-2]),
                sophia.count_skipped_refresh,
            )

        def assign_all(totals, count):
            for h, total in zip(slots, totals):
                strategy.extended.update(
                    h, _assign_ema, args=(total, count), group=False
                )

        def _assign_ema(h, total, count):
            estimate = sophia.estimator.finalize([total], count)[0]
            h.assign(sophia.hessian_ema(h, estimate))

        if slots:
            # Every replica holds the same flag (it comes from iterations).
            refresh_here = strategy.experimental_local_results(is_refresh)[0]
            tf.cond(refresh_here, reduce_and_update, lambda: None)

    replica.merge_call(update, args=(is_refresh, sums, count, broken))
    # The h updates above are traced: no missing-Hessian warning.
    sophia._hessian_seen = True
    return y_pred, grads


def all_finite(tensors):
    """Whether every entry of every tensor (or IndexedSlices) is finite."""
    return tf.reduce_all([
        tf.reduce_all(tf.math.is_finite(
            t.values if isinstance(t, tf.IndexedSlices) else t
        ))
        for t in tensors if t is not None
    ])
