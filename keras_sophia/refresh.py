"""The Hessian-refreshing train step, written once for every backend.

`train_step` is the sequence of every step of `SophiaTrainStep`:

1. decide: `Sophia.should_refresh_hessian()`, read from `iterations`
   inside the compiled step;
2. on refresh steps (`Refresh`):
   a. gather: the training pass and the estimator's `(sums, count)` for
      this replica's batch, from an `EstimatorContext` that shares the
      training pass, or chunk after chunk of the Hessian share (`gather`);
   b. combine: sums and counts added over the replicas (on one replica,
      and on JAX, where the step is one program over the global batch,
      there is nothing to add);
   c. check: a NaN or Inf in any replica's gradient or statistics leaves
      `h` alone and counts the refresh in `skipped_refreshes` (under
      float16 loss scaling the step overflowed: `LossScaleOptimizer`
      skips it, and the EMA would keep a bad estimate for good);
   d. update: `estimator.finalize(totals, count)` into
      `Sophia.update_hessian`, on every replica's copy of `h`;
   other steps run Keras's own training pass; both update the metrics;
3. check the gradient: a NaN or Inf skips the update and is counted in
   `skipped_steps`, else the optimizer applies it;
4. `Sophia.update_diagnostics` on refresh steps, and the logs.

Everything a backend does differently is a method of its `Primitives`
(`primitives.py`). On several TensorFlow replicas the combine cannot run
inside the conditional that selects refresh steps, so that backend's
`branch` gathers under it and combines after it (`distributed.py`).
"""

import inspect

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_sophia import estimators as estimators_lib
from keras_sophia.sophia import Sophia


def train_step(primitives, sophia, x, y, sample_weight):
    """One step of `primitives.model` with optimizer `sophia` (a `Sophia`,
    possibly inside a `LossScaleOptimizer`); returns the logs."""
    batch = (x, y, sample_weight)
    sophia._expect_estimates(primitives.variables)
    # Read from `iterations` inside the compiled step; a Python counter
    # would be frozen when the step is traced.
    is_refresh = sophia.should_refresh_hessian()

    def ordinary():
        y_pred, grads = primitives.forward_backward(batch)
        return primitives.metrics(x, y, y_pred, sample_weight), grads

    # Metrics inside each branch: only scalars leave it, not the output
    # (logits-sized).
    logs, grads = primitives.branch(is_refresh,
                                    Refresh(primitives, sophia, batch),
                                    ordinary)
    grads = primitives.all_reduce(grads)
    # A NaN or Inf gradient never reaches m or the weights: the step is
    # skipped and counted (a refresh on it has already left h alone).
    # Under float16 loss scaling the LossScaleOptimizer skips it itself,
    # and must, to lower its scale.
    finite = primitives.all_finite(grads)
    sophia.skipped_steps.assign_add(
        ops.cast(ops.logical_not(finite), sophia.skipped_steps.dtype))
    if sophia is primitives.model.optimizer:
        primitives.apply_if(finite, grads)
    else:
        primitives.apply(grads)
    primitives.cond(is_refresh, sophia.update_diagnostics, lambda: None)
    # As of the last refresh step; reading four scalars costs nothing.
    logs = dict(logs)
    for name in ("win_rate", "hessian_norm", "skipped_steps",
                 "skipped_refreshes"):
        logs[name] = ops.copy(getattr(sophia, name).value)
    return logs


class Refresh:
    """The refresh of one step: `run()` = `gather()`, then `commit`."""

    def __init__(self, primitives, sophia, batch):
        self.primitives = primitives
        self.sophia = sophia
        self.batch = batch

    def run(self):
        """`(logs, grads)` of the step, after `h` is updated."""
        logs, grads, (sums, count) = self.gather()
        self.commit(sums, count, self.primitives.all_finite(grads + sums))
        return logs, grads

    def gather(self):
        """`(logs, grads, (sums, count))`: the step's metrics, training
        gradient and this replica's estimator statistics."""
        sophia, primitives = self.sophia, self.primitives
        share = slice_size(sophia, self.batch[0])
        chunks = sophia.chunks_for(share)
        whole = sophia.hessian_batch_fraction == 1.0 and chunks == 1
        y_pred, grads, statistics = gather(
            primitives, sophia.estimator, self.batch,
            primitives.step_seed(sophia.seed, sophia.iterations),
            None if whole else share, chunks)
        logs = primitives.metrics(self.batch[0], self.batch[1], y_pred,
                                  self.batch[2])
        return logs, list(grads), statistics

    def commit(self, sums, count, finite, on_each_replica=None):
        """Checks and updates `h` from the combined statistics (stages c
        and d); `on_each_replica(fn, *args)` runs the update on every
        replica's copy (default: here)."""
        run = on_each_replica or (lambda fn, *args: fn(*args))
        sophia = self.sophia

        def update(sums, count):
            estimates = sophia.estimator.finalize(sums, count)
            sophia.update_hessian(estimates, self.primitives.variables)

        self.primitives.cond(finite, lambda: run(update, sums, count),
                             sophia.count_skipped_refresh)


def gather(primitives, estimator, batch, seed, share=None, chunks=1,
           track_loss=True):
    """Forward pass, training gradient and `estimator`'s `(sums, count)`
    for this replica's `batch` = (x, y, sample_weight); `seed` (the
    step's) seeds its draws.

    With `share` None the estimator runs on the whole batch and shares
    the training pass (`Primitives.shared_pass`). Otherwise the training
    pass is Keras's own, and the estimator then runs on the leading
    `share` examples of the batch in `chunks` consecutive chunks, each
    with a forward pass of its own, one after the other, so that at most
    one chunk's passes are alive at a time.
    """
    if share is None:
        y_pred, grads, context = primitives.shared_pass(batch, seed,
                                                        track_loss)
        # After the training backward pass, not beside it: the graph
        # executor would otherwise run both at once and hold the
        # logits-sized tensors of each.
        statistics = primitives.after(
            grads, lambda: estimator.statistics(context))
        return y_pred, grads, statistics
    y_pred, grads = primitives.forward_backward(batch, track_loss)
    return y_pred, grads, _in_chunks(primitives, estimator, batch, grads,
                                     seed, share, chunks)


def _in_chunks(primitives, estimator, batch, grads, seed, share, chunks):
    """The estimator's `(sums, count)` over the leading `share` examples
    of `batch`, chunk after chunk, in a loop of one chunk at a time that
    starts after the training gradients exist."""
    # Which statistics the estimator leaves None (the loss does not
    # depend on the variable): known once the loop has traced its body,
    # which every backend's `loop` does before it returns.
    missing = []

    def body(k, carry):
        sums, count = carry
        start, size = _chunk_rows(share, chunks, k)
        part = tree.map_structure(
            lambda t: None if t is None else _slice_rows(t, start, size),
            batch)
        chunk_sums, chunk_count = estimator.statistics(
            primitives.chunk_context(part, seed, (start, share)))
        missing[:] = [c is None for c in chunk_sums]
        sums = [s if c is None else s + ops.cast(c, "float32")
                for s, c in zip(sums, chunk_sums)]
        return sums, count + ops.cast(chunk_count, "float32")

    zeros = [primitives.zeros(v.shape, seed) for v in primitives.variables]
    sums, count = primitives.loop(
        chunks, body, (zeros, ops.convert_to_tensor(0.0, "float32")), grads)
    return [None if m else s for m, s in zip(missing, sums)], count


def slice_size(sophia, x):
    """`sophia.hessian_share` of the batch `x`: the examples the Hessian is
    estimated on. Static where the batch size is (XLA wants static
    slices)."""
    first = next(t for t in tree.flatten(x) if t is not None)
    if first.shape[0] is not None:
        return sophia.hessian_share(first.shape[0])
    batch = ops.cast(ops.shape(first)[0], "float32")
    return ops.maximum(
        ops.cast(sophia.hessian_batch_fraction * batch, "int32"), 1)


def _chunk_rows(share, chunks, k):
    """(first row, rows) of chunk `k` of the Hessian share: equal chunks
    where the share is static (`Sophia.chunks_for` divides it); a batch
    of unknown size (a graph-mode epoch's last batch) is cut into chunks
    that differ by at most one row."""
    if isinstance(share, int):
        return k * (share // chunks), share // chunks
    start = share * k // chunks
    return start, share * (k + 1) // chunks - start


def _slice_rows(tensor, start, size):
    """Rows `start:start + size` of `tensor`."""
    rank = len(tensor.shape)
    return ops.slice(tensor, [start] + [0] * (rank - 1),
                     [size, *ops.shape(tensor)[1:]])


def estimate_hessian(model, x, y=None, sample_weight=None, estimator=None,
                     seed=0):
    """One Hessian-diagonal estimate on one batch, outside of `fit`.

    For custom training loops and for checking estimators. The model must
    be compiled (its loss is the loss whose Hessian is estimated).

    Args:
        model: A compiled Keras model.
        x, y, sample_weight: One batch.
        estimator: `"gnb"`, `"hutchinson"`, an estimator or a callable; by
            default the estimator of the model's Sophia optimizer.
        seed: Integer (a Python int or a scalar tensor) of the draws, or
            on TensorFlow an int tensor of shape `(2,)`, a step's seed.

    Returns:
        One estimate per `model.trainable_variables` entry (`None` where
        the loss does not depend on the variable).
    """
    if estimator is None:
        sophia = find_sophia(model.optimizer)
        if sophia is None:
            raise ValueError(
                "Pass `estimator=` or compile the model with a Sophia "
                f"optimizer. Received: optimizer={model.optimizer!r}")
        estimator = sophia.estimator
    estimator = estimators_lib.get(estimator)
    primitives = _primitives(model)
    if np.ndim(seed) == 0:
        seed = primitives.step_seed(seed, 0)
    _, _, (sums, count) = gather(primitives, estimator,
                                 (x, y, sample_weight), seed,
                                 track_loss=False)
    return estimator.finalize(sums, count)


def compute_loss(model, x, y, sample_weight, y_pred):
    """`model.compute_loss` in training mode; overrides written before
    Keras 3.3 take no `training` argument (Keras's own step allows them)."""
    kwargs = dict(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
    if "training" in inspect.signature(model.compute_loss).parameters:
        kwargs["training"] = True
    return model.compute_loss(**kwargs)


def check_supported(optimizer, backend):
    """Refuses, naming it, what the step does not support on JAX and
    torch yet: loss scaling and gradient accumulation with Sophia."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not isinstance(inner, Sophia):
        return
    if inner is not optimizer or inner.loss_scale_factor is not None:
        raise ValueError(
            "Loss scaling (LossScaleOptimizer, loss_scale_factor) with "
            f"Sophia is not supported on the {backend} backend yet. Use "
            "mixed_precision 'mixed_bfloat16' (no loss scaling) or the "
            "TensorFlow backend.")
    if inner.gradient_accumulation_steps:
        raise ValueError(
            "gradient_accumulation_steps with Sophia is not supported on "
            f"the {backend} backend yet. Received: "
            "gradient_accumulation_steps="
            f"{inner.gradient_accumulation_steps}")


def find_sophia(optimizer):
    """The Sophia optimizer itself, or the one inside a loss-scale wrapper."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if isinstance(inner, Sophia) else None


def _primitives(model):
    """The primitives of the running backend, on one replica."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_sophia.tf_step import TensorFlow
        return TensorFlow(model, replica=None)
    if backend == "jax":
        from keras_sophia.jax_step import JAX
        return JAX(model)
    from keras_sophia.torch_step import Torch
    return Torch(model)
