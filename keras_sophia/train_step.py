"""The Hessian-refreshing `train_step`: the TensorFlow-specific part.

Everything that needs tapes or `tf.cond` lives here and in `context.py`
(the estimator context, with its stateless draws); `sophia.py` and
`estimators.py` use `keras.ops` only.
"""

import keras
import tensorflow as tf
from keras.src.losses import loss as keras_loss
from tensorflow.compiler.tf2xla.python import xla
from tensorflow.python.framework import ops as tf_ops

from keras_sophia import distributed
from keras_sophia import estimators as estimators_lib
from keras_sophia.context import EstimatorContext
from keras_sophia.multiworker import MultiWorkerFit
from keras_sophia.sophia import Sophia


class SophiaTrainStep(MultiWorkerFit):
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
    forward and backward pass once, lets the optimizer's estimator reuse
    them to estimate the Hessian diagonal at the current weights on the
    current batch, updates `h`, then applies the ordinary update. All other
    steps are Keras's own `train_step`. The logs gain `win_rate` and
    `hessian_norm` (see `Sophia`), as of the last refresh. A step with a
    non-finite gradient is skipped (`skipped_steps`), a non-finite estimate
    leaves `h` alone (`skipped_refreshes`); both counters are logged.

    On more than one replica (see `keras_sophia.distributed`) gradients are
    all-reduced before clipping and the update, for any optimizer, and the
    replicas' estimator statistics are combined before `h` changes. With
    one replica and an optimizer other than `Sophia` (or a
    `LossScaleOptimizer` around one) the step is Keras's own. It includes
    `MultiWorkerFit`, which makes `fit` run under
    MultiWorkerMirroredStrategy.
    """

    def make_train_function(self, force=False):
        distributed.check_compile_options(self)
        return super().make_train_function(force)

    def train_step(self, data):
        if not self.trainable_weights:
            return super().train_step(data)
        sophia = _find_sophia(self.optimizer)
        replica = distributed.replica_context()
        if sophia is None and replica is None:
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_weights

        def ordinary():
            tape = tf.GradientTape()
            y_pred, loss = _training_loss(self, x, y, sample_weight, tape)
            return y_pred, tape.gradient(loss, variables)

        def refresh():
            seed = _step_seed(sophia.seed, sophia._iterations)
            fraction = sophia.hessian_batch_fraction
            if fraction == 1.0:
                return _refresh_pass(
                    self, x, y, sample_weight, sophia.estimator, seed
                )
            # Estimate on a slice: a pass of its own over fewer examples
            # costs less than reusing the full-batch pass.
            y_pred, grads = ordinary()
            part = _leading(fraction, (x, y, sample_weight))
            _, _, statistics = _refresh_pass(
                self, *part, sophia.estimator, seed, track_loss=False
            )
            return y_pred, grads, statistics

        def refresh_and_update():
            y_pred, grads, (sums, count) = refresh()
            estimates = sophia.estimator.finalize(sums, count)
            # LossScaleOptimizer skips a step whose gradients overflowed;
            # its estimate (NaN/inf too, from the same pass) must not reach
            # h, where the EMA would keep it for good. `iterations` does not
            # advance, so the next batch refreshes instead.
            tf.cond(
                distributed.all_finite(grads + estimates),
                lambda: sophia.update_hessian(estimates, variables),
                sophia.count_skipped_refresh,
            )
            return y_pred, grads

        if sophia is not None:
            # The schedule is read from `iterations` inside the compiled
            # step; a Python counter would be frozen when the step is traced.
            is_refresh = sophia.should_refresh_hessian()
        if sophia is None:
            y_pred, grads = ordinary()
        elif replica is None:
            y_pred, grads = tf.cond(is_refresh, refresh_and_update, ordinary)
        else:
            y_pred, grads = distributed.refresh_across_replicas(
                replica, sophia, is_refresh, refresh, ordinary, variables
            )
        if replica is not None:
            distributed.check_optimizer(self.optimizer)
            grads = distributed.all_reduce_gradients(replica, grads)
        if sophia is None:
            distributed.apply(replica, self.optimizer, grads, variables)
        else:
            # A NaN or Inf gradient never reaches m or the weights: the step
            # is skipped and counted (a refresh on it has already left h
            # alone). Under float16 loss scaling the LossScaleOptimizer
            # skips it itself, and must, to lower its scale.
            finite = distributed.all_finite(grads)
            sophia.skipped_steps.assign_add(
                tf.cast(tf.logical_not(finite), tf.int64)
            )
            if sophia is self.optimizer:
                distributed.apply_if(
                    finite, replica, self.optimizer, grads, variables
                )
            else:
                distributed.apply(replica, self.optimizer, grads, variables)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if sophia is not None:
            tf.cond(is_refresh, sophia.update_diagnostics, lambda: None)
            # As of the last refresh step; reading two scalars costs nothing.
            logs["win_rate"] = tf.convert_to_tensor(sophia.win_rate)
            logs["hessian_norm"] = tf.convert_to_tensor(sophia.hessian_norm)
            logs["skipped_steps"] = tf.convert_to_tensor(sophia.skipped_steps)
            logs["skipped_refreshes"] = tf.convert_to_tensor(
                sophia.skipped_refreshes
            )
        return logs


def estimate_hessian(
    model, x, y=None, sample_weight=None, estimator=None, seed=0
):
    """One Hessian-diagonal estimate on one batch, outside of `fit`.

    For custom training loops and for checking estimators. The model must
    be compiled (its loss is the loss whose Hessian is estimated).

    Args:
        model: A compiled Keras model.
        x, y, sample_weight: One batch.
        estimator: `"gnb"`, `"hutchinson"`, an estimator or a callable; by
            default the estimator of the model's Sophia optimizer.
        seed: Integer, or an int tensor of shape `(2,)`, of the draws.

    Returns:
        One estimate per `model.trainable_variables` entry (`None` where
        the loss does not depend on the variable).
    """
    if estimator is None:
        sophia = _find_sophia(model.optimizer)
        if sophia is None:
            raise ValueError(
                "Pass `estimator=` or compile the model with a Sophia "
                f"optimizer. Received: optimizer={model.optimizer!r}"
            )
        estimator = sophia.estimator
    if isinstance(seed, int):
        seed = _step_seed(seed, 0)
    estimator = estimators_lib.get(estimator)
    _, _, (sums, count) = _refresh_pass(
        model, x, y, sample_weight, estimator, seed, track_loss=False
    )
    return estimator.finalize(sums, count)


def _leading(fraction, data):
    """The first `max(1, floor(fraction * batch))` examples of every
    tensor in `data` (static sizes where the batch size is static, as XLA
    wants)."""
    first = next(t for t in tf.nest.flatten(data) if t is not None)
    batch = first.shape[0]
    if batch is None:
        batch = tf.cast(tf.shape(first)[0], tf.float32)
        size = tf.maximum(tf.cast(fraction * batch, tf.int32), 1)
    else:
        size = max(int(fraction * batch), 1)
    return tf.nest.map_structure(
        lambda t: None if t is None else t[:size], data
    )


def _find_sophia(optimizer):
    """The Sophia optimizer itself, or the one inside a loss-scale wrapper."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if isinstance(inner, Sophia) else None


def _step_seed(seed, iterations):
    """Stateless seed (2,) from the optimizer seed and the step counter."""
    return tf.stack(
        [tf.constant(seed, tf.int64), tf.cast(iterations, tf.int64)]
    )


def _training_loss(model, x, y, sample_weight, tape, track_loss=True):
    """Keras's forward pass and (scaled) loss, recorded on `tape`.

    Mirrors `TensorFlowTrainer.train_step` line for line, so a step through
    the mixin computes the same loss, metrics and loss scaling as Keras.
    """
    with tape:
        if model._call_has_training_arg:
            y_pred = model(x, training=True)
        else:
            y_pred = model(x)
        loss = model._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        if track_loss:
            model._loss_tracker.update_state(
                keras_loss.unscale_loss_for_distribution(loss),
                sample_weight=tf.shape(
                    next(i for i in tf.nest.flatten(x) if i is not None)
                )[0],
            )
        if model.optimizer is not None:
            loss = model.optimizer.scale_loss(loss)
    return y_pred, loss


def _refresh_pass(model, x, y, sample_weight, estimator, seed, track_loss=True):
    """Forward, training gradient and the estimator's `(sums, count)` for
    this replica, sharing one pass.

    The inner tape records the forward pass (GNB differentiates the sampled
    loss through it); the outer tape records the training gradient
    (Hutchinson differentiates it once more). In a compiled step a tape
    costs nothing unless a gradient is taken from it.
    """
    variables = model.trainable_weights
    outer = tf.GradientTape(persistent=True)
    inner = tf.GradientTape(persistent=True)
    with outer:
        y_pred, loss = _training_loss(
            model, x, y, sample_weight, inner, track_loss
        )
        grads = inner.gradient(loss, variables)
    # Undo loss scaling and Keras's 1 / replicas factor, so the estimator
    # sees this replica's own mean loss.
    scale = model.optimizer.scale_loss(1.0) if model.optimizer else 1.0
    scale = scale / tf.distribute.get_strategy().num_replicas_in_sync
    context = EstimatorContext(model, x, y, sample_weight, y_pred,
                               variables, grads, scale, inner, outer, seed)
    statistics = estimator.statistics(context)
    del inner, outer
    return y_pred, grads, statistics


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
    try:
        tf_ops.gradient_registry.lookup("XlaDynamicUpdateSlice")
        return  # this TensorFlow registers its own
    except LookupError:
        pass

    @tf.RegisterGradient("XlaDynamicUpdateSlice")
    def _gradient(op, grad):
        _, update, indices = op.inputs
        update_shape = tf.shape(update, out_type=indices.dtype)
        to_update = xla.dynamic_slice(grad, indices, update_shape)
        to_operand = xla.dynamic_update_slice(
            grad, tf.zeros_like(update), indices
        )
        return to_operand, to_update, None


_register_xla_dynamic_update_slice_gradient()
