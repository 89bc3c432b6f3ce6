"""The Hessian-refreshing `train_step` on Keras's TensorFlow backend: tapes,
`tf.cond`, `tf.while_loop` and stateless Philox draws for the one refresh
sequence (`refresh.py`); the several-replica parts are in
`distributed.py` and `multiworker.py`.
"""

import keras
import tensorflow as tf

from keras_sophia import distributed
from keras_sophia import keras_internals
from keras_sophia import refresh
from keras_sophia.context import EstimatorContext
from keras_sophia.multiworker import MultiWorkerFit
from keras_sophia.primitives import Primitives
from keras_sophia.saving import RestoresCompile


class SophiaTrainStep(RestoresCompile, MultiWorkerFit):
    """Mixin that refreshes Sophia's Hessian estimate inside `fit`.

    Put it before the Keras model class:

    ```python
    class LM(keras_sophia.SophiaTrainStep, keras.Model):
        pass

    class SophiaGPT2(keras_sophia.SophiaTrainStep,
                     keras_hub.models.GPT2CausalLM):
        pass
    ```

    On steps where `optimizer.should_refresh_hessian()` holds
    (`iterations % k == 0`, step 0 included) `train_step` runs the training
    forward and backward pass, lets the optimizer's estimator estimate the
    Hessian diagonal at the current weights on the current batch (reusing
    the pass, or in chunks with passes of their own: `hessian_chunks`),
    updates `h`, then applies the ordinary update. On the other steps the
    pass is Keras's own: one forward pass, the loss of `compute_loss`
    (added to the logged `loss`, then scaled by a `LossScaleOptimizer`)
    and its gradient, and no estimator. Both kinds of step then end alike:
    a non-finite gradient skips the update, else the optimizer applies it.
    The logs gain `win_rate` and `hessian_norm` (see `Sophia`), as of the
    last refresh. A step with a non-finite gradient is skipped
    (`skipped_steps`), a non-finite estimate leaves `h` alone
    (`skipped_refreshes`); both counters are logged.

    The sequence is `keras_sophia.refresh.train_step`, the same on every
    backend (docs/backends.md). On TensorFlow, on more than one replica
    (see `keras_sophia.distributed`) gradients are all-reduced before
    clipping and the update, for any optimizer, and the replicas'
    estimator statistics are combined before `h` changes. With one
    replica and an optimizer other than `Sophia` (or a
    `LossScaleOptimizer` around one) the step is Keras's own. It includes
    `MultiWorkerFit`, which makes `fit` run under
    MultiWorkerMirroredStrategy.
    """

    def make_train_function(self, force=False):
        distributed.check_compile_options(self)
        return super().make_train_function(force)

    def train_step(self, data):
        sophia = refresh.find_sophia(self.optimizer)
        replica = distributed.replica_context()
        if not self.trainable_weights or (sophia is None and replica is None):
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        primitives = TensorFlow(self, replica)
        if replica is not None:
            distributed.check_optimizer(self.optimizer)
        if sophia is not None:
            return refresh.train_step(primitives, sophia, x, y,
                                      sample_weight)
        # Any other optimizer on several replicas: the global gradient
        # reaches clipping and the update (distributed.py).
        y_pred, grads = primitives.forward_backward((x, y, sample_weight))
        primitives.apply(primitives.all_reduce(grads))
        return self.compute_metrics(x, y, y_pred, sample_weight)


class TensorFlow(Primitives):
    """TensorFlow's primitives; `replica` is the replica context on
    several replicas, else None."""

    def __init__(self, model, replica):
        super().__init__(model)
        self.replica = replica

    def forward_backward(self, batch, track_loss=True):
        tape = tf.GradientTape()
        y_pred, loss = training_loss(self.model, *batch, tape, track_loss)
        return y_pred, tape.gradient(loss, self.variables)

    def shared_pass(self, batch, seed, track_loss=True, second_order=True):
        # The inner tape records the forward pass (GNB differentiates the
        # sampled loss through it), the outer one the training gradient
        # (Hutchinson differentiates it once more); in a compiled step a
        # tape costs nothing unless a gradient is taken from it, so
        # `second_order` changes nothing here.
        outer = tf.GradientTape(persistent=True)
        inner = tf.GradientTape(persistent=True)
        with outer:
            y_pred, loss = training_loss(self.model, *batch, inner,
                                         track_loss)
            grads = inner.gradient(loss, self.variables)
        context = TensorFlowContext(self.model, *batch, y_pred,
                                    self.variables, grads, _scale(self.model),
                                    inner, outer, seed)
        return y_pred, grads, context

    def chunk_context(self, part, seed, rows, second_order=True):
        # In a scope of its own: what the pass assigns (BatchNormalization's
        # moving statistics, seed generators) is dropped with it.
        scope = keras.StatelessScope(collect_losses=True)
        outer = tf.GradientTape(persistent=True)
        inner = tf.GradientTape(persistent=True)
        with scope, outer, inner:
            y_pred = self.model(part[0], training=True)

        # The chunk's own training gradient, built on first use (GNB never
        # asks): one backward pass through the chunk.
        def grads():
            with scope, outer:
                _, loss = training_loss(self.model, *part, inner, False,
                                        y_pred=y_pred)
                return inner.gradient(loss, self.variables)

        return TensorFlowContext(self.model, *part, y_pred, self.variables,
                                 grads, _scale(self.model), inner, outer,
                                 seed, rows=rows)

    def cond(self, pred, true_fn, false_fn):
        return tf.cond(pred, true_fn, false_fn)

    def loop(self, n, body, init):
        # One iteration at a time: neither the graph executor nor XLA may
        # run two chunks at once.
        def step(k, carry):
            return k + 1, body(k, carry)

        _, carry = tf.while_loop(lambda k, _: k < n, step,
                                 (tf.constant(0), init),
                                 parallel_iterations=1)
        return carry

    def all_finite(self, tensors):
        return tf.reduce_all([
            tf.reduce_all(tf.math.is_finite(
                t.values if isinstance(t, tf.IndexedSlices) else t))
            for t in tensors if t is not None
        ])

    def step_seed(self, seed, iterations):
        return tf.stack(
            [tf.cast(seed, tf.int64), tf.cast(iterations, tf.int64)])

    def zeros(self, shape, seed):
        # Filled from an integer the graph only knows at run time (the
        # step counter in `seed`). Grappler folds `tf.zeros` (and
        # `zeros_like`, and `x * 0`) of a static shape into a constant,
        # which the step's graph then holds between steps: one
        # parameter-sized copy per variable beside AdamW's state (measured
        # on the tiny GPT-2 in graph mode); `bitwise_and(x, 0)` it does not
        # fold.
        zero = tf.bitwise.bitwise_and(seed[1], 0)
        return tf.fill(shape, tf.cast(zero, tf.float32))

    def after(self, tensors, fn):
        with tf.control_dependencies(_flat(tensors)):
            return fn()

    def branch(self, is_refresh, refresh_, ordinary):
        if self.replica is None:
            return super().branch(is_refresh, refresh_, ordinary)
        return distributed.refresh_across(self, is_refresh, refresh_,
                                          ordinary)

    def refresh_first(self, is_refresh, refresh_):
        if self.replica is None:
            return super().refresh_first(is_refresh, refresh_)
        return distributed.refresh_across(self, is_refresh, refresh_)

    def all_reduce(self, grads):
        if self.replica is None:
            return grads
        return distributed.all_reduce_gradients(self.replica, grads)

    def apply(self, grads):
        distributed.apply(self.replica, self.model.optimizer, grads,
                          self.variables)

    def apply_if(self, finite, grads):
        distributed.apply_if(finite, self.replica, self.model.optimizer,
                             grads, self.variables)


class TensorFlowContext(EstimatorContext):
    """`EstimatorContext` from TensorFlow tapes.

    `inner` recorded the forward pass, `outer` the training gradient
    `scaled_grads` (or a function that computes it on first use), of the
    loss times `scale` (loss scaling keeps fp16 backward passes from
    underflowing, and Keras divides each replica's loss by the number of
    replicas); the scale is undone here, so an estimator sees this
    replica's own mean loss. `seed` is the step's stateless seed, shape
    (2,).
    """

    def __init__(self, model, x, y, sample_weight, y_pred, variables,
                 scaled_grads, scale, inner, outer, seed, rows=None):
        super().__init__(model, x, y, sample_weight, y_pred, variables, rows)
        self._scaled_grads = scaled_grads
        self._scale = scale
        self._inner, self._outer = inner, outer
        # Each replica draws its own numbers: fold in the replica id.
        replica = tf.distribute.get_replica_context()
        replica_id = 0 if replica is None else replica.replica_id_in_sync_group
        self._seed = tf.random.experimental.stateless_fold_in(
            seed, replica_id, alg="philox")

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
                tf.reduce_prod(tf.shape(first)[:-1]), tf.float32)
        scaled = tf.nest.map_structure(
            lambda c, y: tf.cast(c * factor, y.dtype),
            cotangents, self.y_pred)
        products = self._inner.gradient(
            self.y_pred, self.variables, output_gradients=scaled)
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
            targets, self.variables, output_gradients=cotangents)
        products = [_dense(p) for p in products]
        return self._unscale(products, self._scale / root)

    def _bits(self, shape, draw):
        # Integer Philox draws, converted by the caller: under XLA,
        # TensorFlow's float `stateless_uniform` / `stateless_normal`
        # return other numbers than eager execution does for a seed
        # computed at run time (measured with TF 2.21), while the integer
        # draws agree bit for bit. So a compiled run draws the same probes
        # and labels as an eager one.
        seed = tf.random.experimental.stateless_fold_in(
            self._seed, draw, alg="philox")
        return tf.random.stateless_uniform(
            shape, seed=seed, minval=0, maxval=2**24, dtype=tf.int32,
            alg="philox")

    def _recorded_grads(self):
        if callable(self._scaled_grads):
            self._scaled_grads = self._scaled_grads()
        return self._scaled_grads

    @property
    def _scaled(self):
        """Whether the tapes' gradients carry a factor (loss scale, or
        Keras's 1 / replicas) to undo."""
        return not (isinstance(self._scale, (int, float)) and self._scale == 1)

    def _unscale(self, values, scale):
        if not self._scaled:
            return values
        return [None if v is None else v / tf.cast(scale, v.dtype)
                for v in values]


def training_loss(model, x, y, sample_weight, tape, track_loss=True,
                  y_pred=None):
    """Keras's forward pass (unless `y_pred` is given) and scaled loss,
    recorded on `tape`, as `TensorFlowTrainer.train_step` computes them, so
    a step through the mixin has Keras's loss, metrics and loss scaling."""
    with tape:
        if y_pred is None:
            y_pred = model(x, training=True)
        loss = refresh.compute_loss(model, x, y, sample_weight, y_pred)
        if track_loss:
            keras_internals.track_loss(
                model, loss, x,
                tf.distribute.get_strategy().num_replicas_in_sync)
        if model.optimizer is not None:
            loss = model.optimizer.scale_loss(loss)
    return y_pred, loss



def _scale(model):
    """The factor on the tapes' gradients: the loss scale over Keras's
    number of replicas; undone so the estimator sees this replica's own
    mean loss."""
    scale = model.optimizer.scale_loss(1.0) if model.optimizer else 1.0
    return scale / tf.distribute.get_strategy().num_replicas_in_sync


def _flat(tensors):
    """The tensors of a list of gradients (IndexedSlices opened), for
    control dependencies."""
    return [t for t in tf.nest.flatten(tensors, expand_composites=True)
            if t is not None]


def _dense(value):
    """Dense float32 tensor (estimates live in float32 `h`), or None."""
    if value is None:
        return None
    return tf.cast(tf.convert_to_tensor(value), tf.float32)


def _register_xla_dynamic_update_slice_gradient():
    """Second derivatives through a slice under XLA (Hutchinson + jit).

    Under XLA, the gradient of `tf.slice` is an `XlaDynamicUpdateSlice`
    (the incoming gradient written into zeros), which TensorFlow gives no
    gradient of its own, so differentiating a backward pass through any
    slice (keras-hub's position embedding has one) fails. The op is linear
    in `operand` and `update`: the gradient to `update` is the slice of the
    incoming gradient at `indices`; the gradient to `operand` is the
    incoming gradient with that slice zeroed.
    """

    def gradient(op, grad):
        _, update, indices = op.inputs
        start = tf.cast(indices, tf.int32)
        size = tf.shape(update)
        to_update = tf.slice(grad, start, size)
        # The same slice of `grad` set to zero: subtract it, padded back to
        # the full shape (exact: the slice cancels, the rest has 0 taken).
        after = tf.shape(grad) - start - size
        to_operand = grad - tf.pad(to_update, tf.stack([start, after], 1))
        return to_operand, to_update, None

    try:
        tf.RegisterGradient("XlaDynamicUpdateSlice")(gradient)
    except KeyError:
        pass  # a TensorFlow that registers its own


_register_xla_dynamic_update_slice_gradient()
