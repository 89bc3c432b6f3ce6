"""The Hessian-refreshing train step, written once for every backend.

`train_step` is the sequence of every step of `SophiaTrainStep`:

1. decide: `Sophia.should_refresh_hessian()`, read from `iterations`
   inside the compiled step;
2. on refresh steps (`Refresh`), before the training pass:
   a. gather: the estimator's `(sums, count)` for this replica's Hessian
      share, chunk after chunk, each with a forward pass of its own that
      changes no model state (`Refresh.gather`);
   b. combine: sums and counts added over the replicas (on one replica,
      and on JAX, where the step is one program over the global batch,
      there is nothing to add);
   c. check: a NaN or Inf in any replica's statistics leaves `h` alone
      and counts the refresh in `skipped_refreshes`;
   d. update: `estimator.finalize(totals, count)` into
      `Sophia.update_hessian`, on every replica's copy of `h`;
3. the training pass, Keras's own, once the refresh is done: the
   estimator's buffers are gone before the training gradient exists, so
   a refresh never holds both (docs/train-step.md), and the metrics;
4. check the gradient: a NaN or Inf skips the update and is counted in
   `skipped_steps`, else the optimizer applies it;
5. `Sophia.update_diagnostics` on refresh steps, and the logs.

With `hessian_chunks=1` on the whole batch the refresh instead shares the
training pass (`Refresh.run`): faster, but the estimator's buffers are
then alive beside the training gradient, and the check of stage c also
covers the gradient.

Everything a backend does differently is a method of its `Primitives`
(`primitives.py`). On several TensorFlow replicas the combine cannot run
inside the conditional that selects refresh steps, so that backend's
`branch` and `refresh_first` gather under it and combine after it
(`distributed.py`).
"""

import inspect
import math

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_sophia.sophia import Sophia


def train_step(primitives, sophia, x, y, sample_weight):
    """One step of `primitives.model` with optimizer `sophia` (a `Sophia`,
    possibly inside a `LossScaleOptimizer`); returns the logs."""
    batch = (x, y, sample_weight)
    sophia._expect_estimates(primitives.variables)
    # Read from `iterations` inside the compiled step; a Python counter
    # would be frozen when the step is traced.
    is_refresh = sophia.should_refresh_hessian()
    refresh = Refresh(primitives, sophia, batch)

    def ordinary():
        y_pred, grads = primitives.forward_backward(batch)
        return primitives.metrics(x, y, y_pred, sample_weight), grads

    # Metrics inside each branch: only scalars leave it, not the output
    # (logits-sized).
    if sophia.shares_training_pass:
        logs, grads = primitives.branch(is_refresh, refresh, ordinary)
    else:
        done = primitives.refresh_first(is_refresh, refresh)
        logs, grads = primitives.after(done, ordinary)
    grads = primitives.all_reduce(grads)
    # A NaN or Inf gradient never reaches m or the weights: the step is
    # skipped and counted. Under float16 loss scaling the
    # LossScaleOptimizer skips it itself, and must, to lower its scale.
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
    """The refresh of one step: `estimate()` before the training pass, or
    `run()` sharing it (`Sophia.shares_training_pass`); each is a gather,
    then `commit`."""

    def __init__(self, primitives, sophia, batch):
        self.primitives = primitives
        self.sophia = sophia
        self.batch = batch

    def estimate(self):
        """Updates `h` from the estimator's own passes; returns the
        statistics' count, a scalar that exists once `h` is updated."""
        sums, count = self.gather()
        self.commit(sums, count, self.primitives.all_finite(sums))
        return count

    def gather(self):
        """This replica's `(sums, count)` over its Hessian share, in
        chunks (`Sophia.chunks_for`, from the sizes of this batch)."""
        sophia, primitives = self.sophia, self.primitives
        x = self.batch[0]
        share = hessian_share(sophia, x)
        chunks = sophia.chunks_for(share, example_bytes(primitives.model, x),
                                   parameter_bytes(primitives.variables))
        return _in_chunks(primitives, sophia.estimator, self.batch,
                          primitives.step_seed(sophia.seed,
                                               sophia.iterations),
                          share, chunks)

    def run(self):
        """`(logs, grads)` of the step from the shared training pass,
        after `h` is updated."""
        logs, grads, (sums, count) = self.gather_shared()
        self.commit(sums, count, self.primitives.all_finite(grads + sums))
        return logs, grads

    def gather_shared(self):
        """`(logs, grads, (sums, count))`: the step's metrics, training
        gradient and this replica's statistics from the shared pass."""
        sophia, primitives = self.sophia, self.primitives
        y_pred, grads, statistics = shared_pass(
            primitives, sophia.estimator, self.batch,
            primitives.step_seed(sophia.seed, sophia.iterations))
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


def shared_pass(primitives, estimator, batch, seed, track_loss=True):
    """Forward pass, training gradient and `estimator`'s `(sums, count)`
    for this replica's whole `batch` = (x, y, sample_weight), the
    estimator reusing the training pass (`Primitives.shared_pass`); `seed`
    (the step's) seeds its draws."""
    y_pred, grads, context = primitives.shared_pass(
        batch, seed, track_loss, second_order=estimator.uses_hvp)
    # After the training backward pass, not beside it: the graph executor
    # would otherwise run both at once and hold the logits-sized tensors
    # of each.
    statistics = primitives.after(
        grads, lambda: estimator.statistics(context))
    return y_pred, grads, statistics


def _in_chunks(primitives, estimator, batch, seed, share, chunks):
    """The estimator's `(sums, count)` over the leading `share` examples
    of `batch`, in `chunks` consecutive chunks, one at a time.

    Where the share is known when the step is traced, `chunks` divides
    it. Otherwise chunks of `share // chunks` rows come first, then the
    `share % chunks` chunks of one row more, in two loops: each loop's
    chunks have one size, which XLA sees as static once it compiles for a
    batch (a size that changed from chunk to chunk would be sized for the
    whole share). One chunk runs without a loop or a sum beside it.
    """
    # Which statistics the estimator leaves None (the loss does not
    # depend on the variable): known once a chunk's pass is traced.
    missing = []

    def statistics(start, size):
        part = tree.map_structure(
            lambda t: None if t is None else _slice_rows(t, start, size),
            batch)
        sums, count = estimator.statistics(primitives.chunk_context(
            part, seed, (start, share), second_order=estimator.uses_hvp))
        missing[:] = [s is None for s in sums]
        return sums, ops.cast(count, "float32")

    def one_pass():
        sums, count = statistics(0, share)
        return [ops.cast(s, "float32") for s in sums if s is not None], count

    def chunks_of(first, size):
        """A loop body over chunks of `size` rows from row `first`."""
        def body(k, carry):
            sums, count = carry
            chunk_sums, chunk_count = statistics(first + k * size, size)
            sums = [s if c is None else s + ops.cast(c, "float32")
                    for s, c in zip(sums, chunk_sums)]
            return sums, count + chunk_count
        return body

    def looped():
        zeros = [primitives.zeros(v.shape, seed)
                 for v in primitives.variables]
        carry = (zeros, ops.convert_to_tensor(0.0, "float32"))
        n = chunks if isinstance(share, int) else ops.minimum(chunks, share)
        size, longer = share // n, share % n
        carry = primitives.loop(n - longer, chunks_of(0, size), carry)
        if not isinstance(longer, int):
            # At most the share: XLA compiles this loop's slice even when
            # it runs no chunk (`longer` 0), and refuses rows the batch
            # lacks.
            carry = primitives.loop(
                longer, chunks_of((n - longer) * size,
                                  ops.minimum(size + 1, share)), carry)
        sums, count = carry
        return [s for m, s in zip(missing, sums) if not m], count

    if isinstance(chunks, int) and chunks == 1:
        present, count = one_pass()
    elif isinstance(share, int):
        present, count = looped()
    else:
        # Chosen at run time: one chunk (where parameters dominate) must
        # not pay for the loop's parameter-sized sum either.
        present, count = primitives.cond(ops.equal(chunks, 1), one_pass,
                                         looped)
    present = iter(present)
    return [None if m else next(present) for m in missing], count


def hessian_share(sophia, x):
    """`sophia.hessian_share` of the batch `x`: the examples the Hessian is
    estimated on. Static where the batch size is (XLA wants static
    slices)."""
    first = next(t for t in tree.flatten(x) if t is not None)
    if first.shape[0] is not None:
        return sophia.hessian_share(first.shape[0])
    batch = ops.cast(ops.shape(first)[0], "float32")
    return ops.maximum(
        ops.cast(sophia.hessian_batch_fraction * batch, "int32"), 1)


# The float32 copies of the model's output a refresh holds per example at
# its peak: the logits (cast), their softmax, the estimator's cotangent
# and the logits' gradient in its backward pass.
OUTPUT_COPIES = 4


def example_bytes(model, x):
    """What one example of `x` costs a refresh, for `hessian_chunks=
    "auto"`: `OUTPUT_COPIES` float32 copies of the model's output for it,
    from the output's shape (`compute_output_spec`, no computation); None
    where a dimension of it is unknown."""
    specs = tree.map_structure(
        lambda t: None if t is None else keras.KerasTensor(
            (None, *t.shape[1:]), t.dtype), x)
    shapes = [spec.shape[1:]
              for spec in tree.flatten(model.compute_output_spec(specs))]
    if any(d is None for shape in shapes for d in shape):
        return None
    return OUTPUT_COPIES * 4 * sum(math.prod(shape) for shape in shapes)


def parameter_bytes(variables):
    """The bytes of `variables`."""
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize
               for v in variables)


def _slice_rows(tensor, start, size):
    """Rows `start:start + size` of `tensor`."""
    rank = len(tensor.shape)
    return ops.slice(tensor, [start] + [0] * (rank - 1),
                     [size, *ops.shape(tensor)[1:]])


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
