"""Every private part of Keras that keras_sophia relies on, in one place.

Keras has no public API for these; each is checked when this module is
imported, so a Keras release that changes one fails here, naming it, and
not deep inside a traced train step. `tests/test_keras_internals.py` checks
that each TensorFlow one still behaves as assumed.

* `Model._loss_tracker`: the `Mean` metric that `fit` reports as `loss`;
  `train_step` feeds it, and a custom `train_step` must too.
* `Optimizer._get_variable_index(variable)`: where a variable's slots sit
  in the optimizer's lists (how every Keras optimizer finds them).
* `Optimizer._iterations`: the step counter in micro-batches; under
  gradient accumulation the public `iterations` counts updates, and a
  refresh belongs to the first micro-batch of one.
* `Optimizer._all_reduce_sum_gradients(grads_and_vars)`: where a
  TensorFlow optimizer all-reduces gradients inside `apply`; on several
  replicas `SophiaTrainStep` reduces them earlier (before clipping) and
  turns this one off while its own `apply` is traced.
* `Optimizer._clip_gradients(grads)`: where `apply` clips (`clipnorm`,
  `clipvalue`, `global_clipnorm`); `train.pretrain` puts there the same
  global-norm clipping plus a record of the norm and of how often it
  clipped, which Keras computes and drops.
* `Model._maybe_symbolic_build(iterator, data_batch)`,
  `Model._make_function(step)` and `Model._distribute_strategy` (the
  strategy a model was built under, None outside one), and
  `_collective_all_reduce_multi_worker` of the TensorFlow trainer:
  `MultiWorkerFit` overrides the first two and asks the others, exactly
  as Keras's `fit` does (see `multiworker.py`).

Only the backend's own parts are checked, and TensorFlow is imported on
its own backend only.
"""

import contextlib
import threading

import keras

_BACKEND = keras.backend.backend()
if _BACKEND == "tensorflow":
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as _tf_trainer


def _require(owner, name, what):
    if not hasattr(owner, name):
        raise ImportError(
            f"keras_sophia needs {what} (`{name}`), which Keras "
            f"{keras.__version__} does not have; keras_sophia is tested with "
            "Keras 3.11 to 3.15 (see setup.cfg)."
        )
    return getattr(owner, name)


_require(keras.optimizers.Optimizer, "_clip_gradients",
         "the optimizer's gradient clipping")
_require(keras.optimizers.Optimizer, "_get_variable_index",
         "the optimizer's slot index")
if _BACKEND == "tensorflow":
    _require(keras.Model, "_maybe_symbolic_build", "Keras's fit-time build")
    _require(keras.Model, "_make_function", "Keras's step-function builder")
    _require(keras.optimizers.Optimizer, "_all_reduce_sum_gradients",
             "the TensorFlow optimizer's gradient all-reduce")
    collective_all_reduce_multi_worker = _require(
        _tf_trainer, "_collective_all_reduce_multi_worker",
        "the TensorFlow trainer's multi-worker test")


def variable_index(optimizer, variable):
    """Position of `variable`'s slots in `optimizer`'s slot lists."""
    return optimizer._get_variable_index(variable)


def micro_batch_iterations(optimizer):
    """The step counter in micro-batches (equal to `iterations` without
    gradient accumulation)."""
    return optimizer._iterations


def model_strategy(model):
    """The strategy `model` was made under, or None outside any."""
    return model._distribute_strategy


def symbolic_build(parent, data_batch):
    """Keras's fit-time build from one batch; `parent` is `super()` of
    the model class that overrides it."""
    return parent._maybe_symbolic_build(data_batch=data_batch)


def make_function(model, step):
    """Keras's compiled (or eager) step function around `step(data)`."""
    return model._make_function(step)


def track_loss(model, loss, x, replicas=1):
    """Adds a step's loss to what `fit` logs as `loss`, weighted by the
    batch size, as Keras's `train_step` does. `loss` is the loss of
    `model.compute_loss`, which Keras divides by the number of
    `replicas`."""
    tracker = _require(model, "_loss_tracker", "the model's loss metric")
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    tracker.update_state(loss * replicas,
                         sample_weight=keras.ops.shape(first)[0])


def replace_gradient_clipping(optimizer, clip):
    """`optimizer.apply` clips with `clip(grads) -> grads` in place of
    its own clipping, at the same point of the update."""
    optimizer._clip_gradients = clip
    return optimizer


# Per thread: MirroredStrategy traces each replica's step in its own thread.
_tracing = threading.local()


@contextlib.contextmanager
def gradients_already_reduced(optimizer):
    """Within: `optimizer.apply`, traced by this replica, skips its own
    all-reduce. Outside (a user's own `apply`) it still reduces."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if "_all_reduce_sum_gradients" not in vars(inner):
        reduce = inner._all_reduce_sum_gradients

        def reduce_unless_done(grads_and_vars):
            if getattr(_tracing, "reduced", False):
                return list(grads_and_vars)
            return reduce(grads_and_vars)

        inner._all_reduce_sum_gradients = reduce_unless_done
    _tracing.reduced = True
    try:
        yield
    finally:
        _tracing.reduced = False
