"""What each Keras backend supplies to the one refresh sequence
(`refresh.py`): derivatives, control flow and state, and nothing else.

`Primitives` is the interface; `tf_step.TensorFlow`, `jax_step.JAX` and
`torch_step.Torch` implement it. The sequence calls only these methods and
`keras.ops`, so a change to the refresh is made once for every backend.
"""

import abc

from keras import ops


class Primitives(abc.ABC):
    """One backend's primitives for the train step of `model`.

    Stateful everywhere: the sequence assigns to Keras variables (`h`,
    the counters, the weights through `optimizer.apply`). On JAX, whose
    trainer is stateless, the step runs inside a `keras.StatelessScope`
    and `cond` carries the scope's values through `jax.lax.cond`.
    """

    def __init__(self, model):
        self.model = model
        self.variables = model.trainable_weights

    @abc.abstractmethod
    def forward_backward(self, batch, track_loss=True):
        """Keras's own training pass on `batch` = (x, y, sample_weight):
        `(y_pred, grads)` of `compute_loss`, scaled as Keras scales it;
        the loss is added to the logged `loss` if `track_loss`."""

    @abc.abstractmethod
    def shared_pass(self, batch, seed, track_loss=True, second_order=True):
        """The training pass recorded for an estimator to reuse:
        `(y_pred, grads, context)` with `context` an `EstimatorContext`
        on the whole batch; its `hvp` works where `second_order`
        (`HessianEstimator.uses_hvp`)."""

    @abc.abstractmethod
    def chunk_context(self, part, seed, rows, second_order=True):
        """An `EstimatorContext` on `part` = (x, y, sample_weight), from a
        forward pass of its own in training mode that changes no state
        (BatchNormalization's moving statistics and seed generators
        advance on the training pass only); `rows` = (first row, rows of
        the share) places its per-example draws; its `hvp` works where
        `second_order`."""

    @abc.abstractmethod
    def cond(self, pred, true_fn, false_fn):
        """`true_fn()` if `pred` (a boolean tensor) else `false_fn()`,
        inside a compiled step too; both return the same structure, and
        what either assigns to variables is kept."""

    @abc.abstractmethod
    def loop(self, n, body, init):
        """`carry = body(k, carry)` for k in 0..n-1 (`n` an int or an int
        tensor) from `init`, one iteration at a time (a chunk must not run
        beside another). `body` changes no state."""

    @abc.abstractmethod
    def all_finite(self, tensors):
        """Whether every entry of every tensor (None skipped) is finite."""

    @abc.abstractmethod
    def step_seed(self, seed, iterations):
        """The seed of one step's draws, a pure function of the
        optimizer's seed and the step counter."""

    def zeros(self, shape, seed):
        """float32 zeros of `shape` (`seed`, the step seed, for backends
        that must fill them at run time)."""
        del seed
        return ops.zeros(shape, "float32")

    def after(self, tensors, fn):
        """`fn()`, run after `tensors` exist (the graph executor would
        otherwise be free to run it beside what makes them; JAX's `cond`
        threads the state, so what reads it after a `cond` waits for
        it)."""
        del tensors
        return fn()

    def branch(self, is_refresh, refresh, ordinary):
        """`refresh.run()` on refresh steps, else `ordinary()`."""
        return self.cond(is_refresh, refresh.run, ordinary)

    def refresh_first(self, is_refresh, refresh):
        """`refresh.estimate()` on refresh steps: a float32 scalar that
        exists once `h` is updated (or left alone)."""
        return self.cond(is_refresh, refresh.estimate,
                         lambda: ops.zeros((), "float32"))

    def all_reduce(self, grads):
        """The gradients summed over replicas (one replica: as they are)."""
        return grads

    def metrics(self, x, y, y_pred, sample_weight):
        """Keras's `compute_metrics`: the step's logs."""
        return self.model.compute_metrics(x, y, y_pred,
                                          sample_weight=sample_weight)

    def apply(self, grads):
        """`optimizer.apply` of `grads` to the trainable variables."""
        self.model.optimizer.apply(grads, self.variables)

    def apply_if(self, finite, grads):
        """`apply` where `finite` holds."""
        self.cond(finite, lambda: self.apply(grads), lambda: None)
