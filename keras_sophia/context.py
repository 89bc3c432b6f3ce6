"""The context a Hessian estimator works with (TensorFlow tapes).

`EstimatorContext` is the public interface between a refresh step and an
estimator (`keras_sophia.estimators`): the estimator asks it for the
step's gradients, backward passes and random draws instead of running the
model again.
"""

import numpy as np
import tensorflow as tf


class EstimatorContext:
    """What an estimator may use on a refresh step, and what each use costs.

    `SophiaTrainStep` builds one per refresh step (and `estimate_hessian`
    one per call) from the step's own forward and backward pass, and
    passes it to `HessianEstimator.statistics` (or to a callable
    estimator). Estimators should not build one themselves.

    Costs are counted in forward passes of the training batch (F; a
    backward pass is about 2F). A refresh step already pays for the
    training forward and backward pass (3F); nothing below repeats them.

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
            order; every list below follows it.
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
            one per variable (`vectors` shaped like the variables), by
            differentiating the recorded training gradient once more
            (reverse over reverse): a backward pass through both the
            forward and the first backward pass, about 2.3 training
            gradients (7F) under XLA on the tiny GPT-2 (BENCHMARKS.md), and
            the first backward pass's intermediate values stay alive until
            it is done (there, 5.3 times a training gradient's peak
            memory).
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
                 scaled_grads, scale, inner, outer, seed, rows=None):
        # `inner` recorded the forward pass, `outer` the training gradient
        # `scaled_grads` (or a function that computes it on first use), of
        # the loss times `scale` (loss scaling keeps
        # fp16 backward passes from underflowing, and Keras divides each
        # replica's loss by the number of replicas); the scale is undone
        # here, so an estimator sees this replica's own mean loss. `seed`
        # is the step's stateless seed, shape (2,); `rows` = (first row,
        # rows of the share) places a chunk's per-example draws (None: this
        # batch is the share).
        self.model = model
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.y_pred = y_pred
        self.variables = variables
        self._scaled_grads = scaled_grads
        self._scale = scale
        self._inner, self._outer = inner, outer
        # Each replica draws its own numbers: fold in the replica id.
        replica = tf.distribute.get_replica_context()
        replica_id = 0 if replica is None else replica.replica_id_in_sync_group
        self._seed = tf.random.experimental.stateless_fold_in(
            seed, replica_id, alg="philox"
        )
        self._draws = 0
        self._rows = rows

    @property
    def examples(self):
        first = next(t for t in tf.nest.flatten(self.x) if t is not None)
        return tf.cast(tf.shape(first)[0], tf.float32)

    @property
    def grads(self):
        return self._unscale(
            [None if g is None else tf.convert_to_tensor(g)
             for g in self._recorded_grads()],
            self._scale,
        )

    def vjp(self, cotangents):
        # Loss scaling keeps fp16 in range for the training loss, a mean
        # over n terms. A cotangent summed over the terms (GNB's) is n times
        # larger and overflowed at `scale`; at `scale / n` each term enters
        # the backward pass as large as it does in the training pass.
        factor = self._scale
        if self._scaled:
            # n from the leading axes: the size with the classes would pass
            # int32 for GPT-2 at 60 x 1024 tokens per replica.
            first = tf.nest.flatten(self.y_pred)[0]
            factor = factor / tf.cast(
                tf.reduce_prod(tf.shape(first)[:-1]), tf.float32
            )
        scaled = tf.nest.map_structure(
            lambda c, y: tf.cast(c * factor, y.dtype),
            cotangents, self.y_pred,
        )
        products = self._inner.gradient(
            self.y_pred, self.variables, output_gradients=scaled
        )
        return self._unscale([_dense(p) for p in products], factor)

    def hvp(self, vectors):
        # d/dθ <grad(θ), v> = H v. A sparse gradient (embedding rows)
        # contributes only through the rows it holds. The recorded gradient
        # carries the loss scale s; with cotangent v / c the second backward
        # pass carries s / c on the forward activations' adjoints and 1 / c
        # on those of the first backward pass. c = sqrt(s) keeps both in
        # fp16 range: on a tiny GPT-2, c = 1 overflowed at s = 2^15 and
        # c = s lost precision from s = 2^18.
        root = tf.sqrt(self._scale) if self._scaled else 1.0
        targets, cotangents = [], []
        for grad, vector in zip(self._recorded_grads(), vectors):
            if grad is None:
                continue
            if isinstance(grad, tf.IndexedSlices):
                targets.append(grad.values)
                vector = tf.gather(vector, grad.indices)
            else:
                targets.append(grad)
            cotangents.append(tf.cast(vector / root, targets[-1].dtype))
        products = self._outer.gradient(
            targets, self.variables, output_gradients=cotangents
        )
        products = [_dense(p) for p in products]
        return self._unscale(products, self._scale / root)

    def _recorded_grads(self):
        if callable(self._scaled_grads):
            self._scaled_grads = self._scaled_grads()
        return self._scaled_grads

    # Integer Philox draws, converted here: under XLA, TensorFlow's float
    # `stateless_uniform` / `stateless_normal` return other numbers than
    # eager execution does for a seed computed at run time (measured with
    # TF 2.21), while the integer draws agree bit for bit. So a compiled
    # run draws the same probes and labels as an eager one.
    def uniform(self, shape, per_example=False):
        """Uniform in [0, 1) on a 2**-24 grid (float32's resolution)."""
        start = None
        if per_example and self._rows is not None:
            start, share = self._rows
            size, shape = shape[0], [share, *shape[1:]]
        bits = tf.random.stateless_uniform(
            shape, seed=self._next_seed(), minval=0, maxval=_GRID,
            dtype=tf.int32, alg="philox",
        )
        if start is not None:
            rank = len(bits.shape)
            bits = tf.slice(bits, [start] + [0] * (rank - 1),
                            [size] + [-1] * (rank - 1))
        return tf.cast(bits, tf.float32) / _GRID

    def normal(self, shape):
        """Standard normal by Box-Muller from two uniforms."""
        radius_u = (self.uniform(shape) * _GRID + 0.5) / _GRID  # in (0, 1)
        angle_u = self.uniform(shape)
        return tf.sqrt(-2.0 * tf.math.log(radius_u)) * tf.cos(
            2.0 * np.pi * angle_u
        )

    def _next_seed(self):
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(
            self._seed, self._draws, alg="philox"
        )

    @property
    def _scaled(self):
        """Whether the tapes' gradients carry a factor (loss scale, or
        Keras's 1 / replicas) to undo."""
        return not (isinstance(self._scale, (int, float)) and self._scale == 1)

    def _unscale(self, values, scale):
        if not self._scaled:
            return values
        return [
            None if v is None else v / tf.cast(scale, v.dtype)
            for v in values
        ]


_GRID = 2**24


def _dense(value):
    """Dense float32 tensor (estimates live in float32 `h`), or None."""
    if value is None:
        return None
    return tf.cast(tf.convert_to_tensor(value), tf.float32)
