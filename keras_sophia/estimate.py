"""`estimate_hessian`: one Hessian-diagonal estimate outside of `fit`,
through the refresh's own passes (`refresh.shared_pass`) on the running
backend's primitives. It sits above the backends, as `SophiaTrainStep`
does: `refresh` is written once and imports none of them."""

import keras
import numpy as np

from keras_sophia import estimators as estimators_lib
from keras_sophia import refresh


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
        sophia = refresh.find_sophia(model.optimizer)
        if sophia is None:
            raise ValueError(
                "Pass `estimator=` or compile the model with a Sophia "
                f"optimizer. Received: optimizer={model.optimizer!r}")
        estimator = sophia.estimator
    estimator = estimators_lib.get(estimator)
    primitives = _primitives(model)
    if np.ndim(seed) == 0:
        seed = primitives.step_seed(seed, 0)
    _, _, (sums, count) = refresh.shared_pass(
        primitives, estimator, (x, y, sample_weight), seed, track_loss=False)
    return estimator.finalize(sums, count)


def _primitives(model):
    """The primitives of the running backend, on one replica (only its
    module is imported: each imports its framework)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_sophia.tf_step import TensorFlow
        return TensorFlow(model, replica=None)
    if backend == "jax":
        from keras_sophia.jax_step import JAX
        return JAX(model)
    from keras_sophia.torch_step import Torch
    return Torch(model)
