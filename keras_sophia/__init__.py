"""Sophia (arXiv 2305.14342) for Keras 3: the optimizer on every backend,
the Hessian-refreshing train step on TensorFlow, JAX and torch."""

import keras

from keras_sophia import estimators
from keras_sophia.context import EstimatorContext
from keras_sophia.estimators import GaussNewtonBartlett
from keras_sophia.estimators import HessianEstimator
from keras_sophia.estimators import Hutchinson
from keras_sophia.estimate import estimate_hessian
from keras_sophia.sophia import Sophia

# The train step's primitives are backend code (tf_step.py, jax_step.py,
# torch_step.py, around the one sequence of refresh.py); importing one
# never imports another backend.
if keras.backend.backend() == "jax":
    from keras_sophia.jax_step import SophiaTrainStep
elif keras.backend.backend() == "tensorflow":
    from keras_sophia.multiworker import MultiWorkerFit
    from keras_sophia.tf_step import SophiaTrainStep
else:
    from keras_sophia.torch_step import SophiaTrainStep

__version__ = "0.1.0"

__all__ = [
    "EstimatorContext",
    "GaussNewtonBartlett",
    "HessianEstimator",
    "Hutchinson",
    "Sophia",
    "SophiaTrainStep",
    "estimate_hessian",
    "estimators",
] + (["MultiWorkerFit"] if keras.backend.backend() == "tensorflow" else [])
