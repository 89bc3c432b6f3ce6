"""The context a Hessian estimator works with: one interface for every
backend.

`EstimatorContext` is the public interface between a refresh step and an
estimator (`keras_sophia.estimators`): the estimator asks it for the
step's gradients, backward passes and random draws instead of running the
model again. The draws are written here once; each backend module
(`tf_step`, `jax_step`, `torch_step`) implements the three derivatives
and the random bits.
"""

import abc

import numpy as np
from keras import ops
from keras import tree


class EstimatorContext(abc.ABC):
    """What an estimator may use on a refresh step, and what each use costs.

    `SophiaTrainStep` builds one per refresh step (and `estimate_hessian`
    one per call) from the step's own forward and backward pass, and
    passes it to `HessianEstimator.statistics` (or to a callable
    estimator). Estimators should not build one themselves.

    Costs are counted in forward passes of the training batch (F; a
    backward pass is about 2F). A refresh step already pays for the
    training forward and backward pass (3F); nothing below repeats them.
    docs/backends.md lists what differs from backend to backend.

    Attributes:
        model: The Keras model being trained.
        x, y, sample_weight: This replica's batch, or one chunk of its
            Hessian share: the leading `hessian_batch_fraction` of it, cut
            into `hessian_chunks` (see `Sophia`), each run through the
            model on its own, so that the passes below run through the
            chunk only.
        y_pred: The model's output on `x` from the recorded forward pass
            (the logits, for a language model): the training pass's on
            the whole batch in one chunk, else the chunk's own. Free.
        variables: The trainable variables, in `model.trainable_weights`
            order (on JAX their values in this step: the step is
            stateless); every list below follows it.
        grads: The training gradients of this replica's own mean loss
            on `x`, from the step's backward pass. Free on the whole batch,
            except that under loss scaling or on several replicas the scale
            is divided out, one parameter-sized copy; on a chunk, one
            backward pass through the chunk (`hvp` needs it too).

    Methods:
        vjp(cotangents): `sum(y_pred * cotangents)` differentiated with
            respect to the variables through the recorded forward pass:
            one backward pass (2F), dense float32 results (one parameter-
            sized tensor each). `cotangents` has the structure and shape
            of `y_pred`; making it is the estimator's cost (for GNB one
            logits-sized tensor). Under float16 loss scaling the pass runs
            at `scale / terms`, sized for a cotangent summed, not
            averaged, over the loss terms.
        hvp(vectors): Hessian-vector products `H v` of the training loss,
            one per variable (`vectors` shaped like the variables). On
            TensorFlow and torch by differentiating the recorded training
            gradient once more (reverse over reverse): a backward pass
            through both the forward and the first backward pass, about
            2.3 training gradients (7F) under XLA on the tiny GPT-2
            (BENCHMARKS.md), and the first backward pass's intermediate
            values stay alive until it is done. On JAX forward over
            reverse (`jax.jvp` of the gradient), a pass of its own.
        uniform(shape, per_example=False), normal(shape): float32 draws
            in [0, 1) and from a standard normal, independent per call and
            per replica, and a pure function of `(optimizer.seed,
            iterations)`, so a resumed run draws the same numbers. One
            tensor of `shape` (normal: two). Every chunk of a chunked
            refresh (`Sophia(hessian_chunks=...)`) draws the same numbers
            for the same calls: one probe for all chunks. With
            `per_example=True`, `shape[0]` is this batch's axis and the
            draw is this chunk's rows of one draw over the whole Hessian
            share, so chunked and unchunked refreshes draw alike.
        examples: The number of examples in `x` (a float32 scalar), to
            weigh a mean over this batch against other chunks and replicas.
    """

    def __init__(self, model, x, y, sample_weight, y_pred, variables,
                 rows=None):
        # `rows` = (first row, rows of the share) places a chunk's
        # per-example draws (None: this batch is the share).
        self.model = model
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.y_pred = y_pred
        self.variables = list(variables)
        self._rows = rows
        self._draws = 0

    @property
    def examples(self):
        first = next(t for t in tree.flatten(self.x) if t is not None)
        return ops.cast(ops.shape(first)[0], "float32")

    @property
    @abc.abstractmethod
    def grads(self):
        """The training gradients (see the class docstring)."""

    @abc.abstractmethod
    def vjp(self, cotangents):
        """The output's backward pass (see the class docstring)."""

    @abc.abstractmethod
    def hvp(self, vectors):
        """Hessian-vector products (see the class docstring)."""

    @abc.abstractmethod
    def _bits(self, shape, draw):
        """int32 in [0, 2**24) of `shape`: the `draw`-th draw of this
        context's stream (a pure function of the step seed, the replica
        and `draw`)."""

    def uniform(self, shape, per_example=False):
        """Uniform in [0, 1) on a 2**-24 grid (float32's resolution)."""
        self._draws += 1
        shape = list(shape)
        if per_example and self._rows is not None:
            start, share = self._rows
            bits = self._bits([share, *shape[1:]], self._draws)
            bits = ops.slice(bits, [start] + [0] * (len(shape) - 1), shape)
        else:
            bits = self._bits(shape, self._draws)
        return ops.cast(bits, "float32") / GRID

    def normal(self, shape):
        """Standard normal by Box-Muller from two uniforms."""
        radius_u = (self.uniform(shape) * GRID + 0.5) / GRID  # in (0, 1)
        angle_u = self.uniform(shape)
        return ops.sqrt(-2.0 * ops.log(radius_u)) * ops.cos(
            2.0 * np.pi * angle_u)


GRID = 2**24
