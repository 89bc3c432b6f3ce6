"""Keras's PyTorch backend: the optimizer runs there; the Hessian refresh
does not yet, and says so.

`Sophia` is written in `keras.ops`, so `model.compile(optimizer=Sophia())`
and plain `fit` train on torch as on the other backends, and warn, as
there, that no Hessian estimate reaches the optimizer (every step is then
sign-momentum). The train step that feeds it estimates is TensorFlow's
and JAX's only; on torch it refuses at once, by name, rather than train
something that is not Sophia.
"""

import keras

_REFUSAL = (
    "keras_sophia.{name} does not support Keras's torch backend yet "
    "(KERAS_BACKEND={backend}): use KERAS_BACKEND=tensorflow or jax for "
    "Sophia with its Hessian refresh. On torch, Sophia trains with plain "
    "`fit` but receives no Hessian estimate (sign-momentum steps)."
)


def _refuse(name):
    return RuntimeError(
        _REFUSAL.format(name=name, backend=keras.backend.backend()))


class SophiaTrainStep:
    """Refuses, when the model is made, to run on torch (module
    docstring)."""

    def __init__(self, *args, **kwargs):
        raise _refuse("SophiaTrainStep")


def estimate_hessian(model, x, y=None, sample_weight=None, estimator=None,
                     seed=0):
    """Refuses on torch (module docstring)."""
    raise _refuse("estimate_hessian")
