"""The Hessian-refreshing `train_step`: the TensorFlow-specific part.

Everything that needs tapes or `tf.cond` lives here, in `refresh.py` (the
Hessian refresh) and in `context.py` (the estimator context, with its
stateless draws); `sophia.py` and `estimators.py` use `keras.ops` only.
"""

import keras
import tensorflow as tf

from keras_sophia import distributed
from keras_sophia import estimators as estimators_lib
from keras_sophia import refresh
from keras_sophia.multiworker import MultiWorkerFit
from keras_sophia.saving import RestoresCompile
from keras_sophia.sophia import Sophia


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
    forward and backward pass once, lets the optimizer's estimator reuse
    them to estimate the Hessian diagonal at the current weights on the
    current batch, updates `h`, then applies the ordinary update. On the
    other steps the pass is `keras_sophia.refresh.forward_backward`: one
    forward pass, the loss of `compute_loss` (added to the logged `loss`,
    then scaled by a `LossScaleOptimizer`) and its gradient on one tape,
    as Keras's own `train_step` computes them, and no estimator. Both
    kinds of step then end alike: a non-finite gradient skips the update,
    else the optimizer applies it; then `compute_metrics`. The logs gain
    `win_rate` and `hessian_norm` (see `Sophia`), as of the last refresh.
    A step with a non-finite gradient is skipped (`skipped_steps`), a
    non-finite estimate leaves `h` alone (`skipped_refreshes`); both
    counters are logged.

    The refresh itself is `keras_sophia.refresh.HessianRefresh`. On more
    than one replica (see `keras_sophia.distributed`) gradients are
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
        sophia = _find_sophia(self.optimizer)
        replica = distributed.replica_context()
        if not self.trainable_weights or (sophia is None and replica is None):
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_weights
        if sophia is None:
            y_pred, grads = refresh.forward_backward(
                self, x, y, sample_weight)
        else:
            y_pred, grads, is_refresh = refresh.HessianRefresh(self, sophia)(
                x, y, sample_weight, replica)
        if replica is not None:
            distributed.check_optimizer(self.optimizer)
            grads = distributed.all_reduce_gradients(replica, grads)
        if sophia is None:
            distributed.apply(replica, self.optimizer, grads, variables)
            return self.compute_metrics(x, y, y_pred, sample_weight)
        # A NaN or Inf gradient never reaches m or the weights: the step is
        # skipped and counted (a refresh on it has already left h alone).
        # Under float16 loss scaling the LossScaleOptimizer skips it itself,
        # and must, to lower its scale.
        finite = refresh.all_finite(grads)
        sophia.skipped_steps.assign_add(
            tf.cast(tf.logical_not(finite), tf.int64))
        if sophia is self.optimizer:
            distributed.apply_if(finite, replica, sophia, grads, variables)
        else:
            distributed.apply(replica, self.optimizer, grads, variables)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        tf.cond(is_refresh, sophia.update_diagnostics, lambda: None)
        # As of the last refresh step; reading four scalars costs nothing.
        for name in ("win_rate", "hessian_norm", "skipped_steps",
                     "skipped_refreshes"):
            logs[name] = tf.convert_to_tensor(getattr(sophia, name))
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
        seed = refresh.step_seed(seed, 0)
    estimator = estimators_lib.get(estimator)
    _, _, (sums, count) = refresh.gather(
        model, x, y, sample_weight, estimator, seed, track_loss=False
    )
    return estimator.finalize(sums, count)


def _find_sophia(optimizer):
    """The Sophia optimizer itself, or the one inside a loss-scale wrapper."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if isinstance(inner, Sophia) else None


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
