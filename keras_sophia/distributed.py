"""What `SophiaTrainStep` does differently when a step runs on several
replicas (`MirroredStrategy`, `MultiWorkerMirroredStrategy`).

Stock Keras all-reduces the gradients inside `optimizer.apply`, *after*
clipping and after `LossScaleOptimizer`'s finite check, so both act on one
replica's gradient. Here the gradients are all-reduced first (one sum, the
same traffic as Keras), the optimizer is told not to reduce them again, and
clipping, the finite check and the update all see the global gradient, which
is identical on every replica.

The replicas' Hessian statistics are summed here too (`refresh_across`),
before `refresh.Refresh.commit`, the one place `h` changes.
"""

import functools

import tensorflow as tf

from keras_sophia import keras_internals


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


def apply(replica, optimizer, grads, variables):
    """`optimizer.apply`, told on several replicas that `grads` are
    already reduced."""
    if replica is None:
        optimizer.apply(grads, variables)
        return
    with keras_internals.gradients_already_reduced(optimizer):
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


def refresh_across(primitives, is_refresh, refresh, ordinary=None):
    """`TensorFlow.refresh_first` (`ordinary` None) or `TensorFlow.branch`
    on several replicas, with the replicas' statistics summed and `h`
    committed on refresh steps. Returns a scalar that exists once `h` is
    committed, or the step's `(logs, grads)` from `ordinary()` or the
    refresh's shared pass.

    TensorFlow refuses a cross-replica sum inside a `tf.cond` in replica
    context, so each replica gathers under the cond, one unconditional
    `merge_call` enters cross-replica context, and a cond there wraps the
    sum and the commit: the all-reduce runs on refresh steps only.
    """
    sophia = refresh.sophia
    variables = primitives.variables
    # Every variable with an `h` slot sends a sum; one the estimator left
    # None sends zeros and is dropped again before the commit.
    slotted = [i for i, v in enumerate(variables)
               if sophia.hessian_slot(v) is not None]
    missing = set()
    seed = primitives.step_seed(sophia.seed, sophia.iterations)

    def gathered():
        if ordinary is None:
            outputs = ()
            sums, count = refresh.gather()
            checked = sums
        else:
            logs, grads, (sums, count) = refresh.gather_shared()
            outputs, checked = (logs, grads), grads + sums
        missing.update(i for i in slotted if sums[i] is None)
        # 1 where this replica's pass overflowed (fp16) or went NaN.
        broken = 1.0 - tf.cast(primitives.all_finite(checked), tf.float32)
        sums = [primitives.zeros(variables[i].shape, seed)
                if sums[i] is None else tf.cast(sums[i], tf.float32)
                for i in slotted]
        return outputs, sums, tf.cast(count, tf.float32), broken

    def other():
        # Ordinary steps send the weights in place of sums, which are
        # never read there: a read shares the variable's buffer, where
        # zeros would be one parameter-sized allocation per step.
        return (() if ordinary is None else ordinary(),
                [_placeholder(variables[i], seed, primitives)
                 for i in slotted],
                tf.constant(0.0), tf.constant(0.0))

    outputs, sums, count, broken = tf.cond(is_refresh, gathered, other)
    # Both branches are traced by now: `missing` is complete. The merge
    # function is replica 0's (its Python arguments are bound here).
    done = primitives.replica.merge_call(
        functools.partial(_sum_and_commit, refresh, slotted, missing),
        args=(is_refresh, sums, count, broken))
    return done if ordinary is None else outputs


def _placeholder(variable, seed, primitives):
    """`variable`'s value where it is float32, else float32 zeros."""
    if variable.dtype == "float32":
        return tf.convert_to_tensor(variable.value)
    return primitives.zeros(variable.shape, seed)


def _sum_and_commit(refresh, slotted, missing, strategy, is_refresh, sums,
                    count, broken):
    """In cross-replica context: on refresh steps, the replicas' sums,
    counts and broken flags added, and `refresh.commit` on each replica's
    copy of `h`. Returns a scalar that exists once that is done."""
    variables = refresh.primitives.variables
    slots = [refresh.sophia.hessian_slot(variables[i]).value
             for i in slotted]

    def sum_and_commit():
        totals = strategy.extended.batch_reduce_to(
            tf.distribute.ReduceOp.SUM,
            list(zip(sums, slots)) + [(count, slots[0]),
                                      (broken, slots[0])])
        full = [None] * len(variables)
        for i, total in zip(slotted, totals):
            full[i] = None if i in missing else total
        refresh.commit(
            full, totals[-2],
            strategy.experimental_local_results(totals[-1])[0] == 0,
            lambda fn, *args: strategy.extended.call_for_each_replica(
                fn, args=args))
        return tf.constant(1.0)

    if not slots:
        return tf.constant(0.0)
    # Every replica holds the same flag (it comes from iterations).
    return tf.cond(strategy.experimental_local_results(is_refresh)[0],
                   sum_and_commit, lambda: tf.constant(0.0))
