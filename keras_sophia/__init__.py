"""Sophia (arXiv 2305.14342) for Keras 3: the optimizer on every backend,
the Hessian-refreshing train step on TensorFlow and JAX."""

import keras

from keras_sophia import estimators
from keras_sophia.estimators import GaussNewtonBartlett
from keras_sophia.estimators import HessianEstimator
from keras_sophia.estimators import Hutchinson
from keras_sophia.sophia import Sophia

# The train step is backend code: TensorFlow's (with tf.distribute) or
# JAX's; importing one never imports the other backend. On torch it
# refuses by name (torch_step.py); the optimizer works everywhere.
if keras.backend.backend() == "jax":
    from keras_sophia.jax_step import EstimatorContext
    from keras_sophia.jax_step import SophiaTrainStep
    from keras_sophia.jax_step import estimate_hessian
elif keras.backend.backend() == "tensorflow":
    from keras_sophia.context import EstimatorContext
    from keras_sophia.multiworker import MultiWorkerFit
    from keras_sophia.train_step import SophiaTrainStep
    from keras_sophia.train_step import estimate_hessian
else:
    from keras_sophia.torch_step import SophiaTrainStep
    from keras_sophia.torch_step import estimate_hessian

__version__ = "0.1.0"

__all__ = [
    "GaussNewtonBartlett",
    "HessianEstimator",
    "Hutchinson",
    "Sophia",
    "SophiaTrainStep",
    "estimate_hessian",
    "estimators",
] + {
    "tensorflow": ["EstimatorContext", "MultiWorkerFit"],
    "jax": ["EstimatorContext"],
}.get(keras.backend.backend(), [])
