"""The Hessian-refreshing `train_step` on Keras's JAX backend.

The JAX counterpart of `train_step.py`, `refresh.py` and `context.py`:
Keras's JAX trainer is stateless (`train_step(state, data)` returns new
values instead of assigning), so a refresh here computes the new `h` and
`skipped_refreshes` as values of the optimizer's state. One compiled step
holds both branches of a `jax.lax.cond` on `iterations % k == 0`; each step
runs one forward pass. On several devices (`keras.distribution`) the step
is one program over the global batch, so an estimator's sums and counts
already cover every device and nothing is combined by hand.

Not supported on JAX yet, each refused with a `ValueError` naming it:
loss scaling (`LossScaleOptimizer`, `loss_scale_factor`) and gradient
accumulation. The JAX trainer's private metrics update feeds the loss
tracker and the metrics, as Keras's step does (`keras_internals.py`).
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_sophia import estimators as estimators_lib
from keras_sophia import keras_internals
from keras_sophia.saving import RestoresCompile
from keras_sophia.sophia import Sophia


class EstimatorContext:
    """What an estimator may use on a refresh step (JAX backend).

    The same attributes and methods as the TensorFlow
    `keras_sophia.EstimatorContext` (read its docstring for their meaning);
    what differs is how they are made and what they cost:

    * `y_pred`, `grads`: from the step's own forward pass and backward
      pass (`jax.vjp` of the loss and the output together). Free on the
      whole batch in one chunk. Otherwise (`hessian_batch_fraction` below
      1, or `hessian_chunks` above 1) each chunk of the Hessian share
      has a forward pass of its own, and `grads` is one more backward
      pass through the chunk.
    * `vjp(cotangents)`: the recorded forward pass's pullback, one backward
      pass (2F) through this context's batch.
    * `hvp(vectors)`: forward over reverse (`jax.jvp` of the gradient):
      a forward and backward pass of its own with tangents, about three
      gradients' worth; it does not reuse the step's pass.
    * `uniform(shape, per_example=False)`, `normal(shape)`: float32 draws
      from `(optimizer.seed, iterations)`, so a resumed run draws the
      same; per-example draws are this chunk's rows of one draw over the
      share, as on TensorFlow.
    * `examples`: the number of examples in `x`.
    * `variables`: the step's values of the trainable variables (arrays,
      in `model.trainable_variables` order): the step is stateless, so the
      Keras variables themselves do not hold them.
    """

    def __init__(self, model, x, y, sample_weight, y_pred, grads, pullback,
                 loss_of, values, key, rows=None):
        # `pullback(c)` is the backward pass of this context's batch with
        # cotangent c on its output; `loss_of(values)` its training loss;
        # `rows` = (first row, rows of the share) places a chunk's
        # per-example draws (None: this batch is the share).
        self.model = model
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.y_pred = y_pred
        self.variables = list(values)
        self._grads, self._pullback = grads, pullback
        self._loss_of, self._values = loss_of, values
        self._key, self._draws = key, 0
        self._rows = rows

    @property
    def examples(self):
        return jnp.float32(jax.tree.leaves(self.x)[0].shape[0])

    @property
    def grads(self):
        if callable(self._grads):
            self._grads = self._grads()
        return [jnp.asarray(g, jnp.float32) for g in self._grads]

    def vjp(self, cotangents):
        # In the output's dtype (bfloat16 under mixed precision), as the
        # pullback requires.
        cotangents = jax.tree.map(lambda c, y: jnp.asarray(c, y.dtype),
                                  cotangents, self.y_pred)
        products = self._pullback(cotangents)
        return [jnp.asarray(p, jnp.float32) for p in products]

    def hvp(self, vectors):
        vectors = [jnp.asarray(v, w.dtype)
                   for v, w in zip(vectors, self._values)]
        _, products = jax.jvp(jax.grad(self._loss_of), (self._values,),
                              (vectors,))
        return [jnp.asarray(p, jnp.float32) for p in products]

    def uniform(self, shape, per_example=False):
        """Uniform in [0, 1) on a 2**-24 grid, as on TensorFlow."""
        self._draws += 1
        key = jax.random.fold_in(self._key, self._draws)
        shape = tuple(shape)
        if per_example and self._rows is not None:
            start, share = self._rows
            bits = jax.lax.dynamic_slice_in_dim(
                jax.random.randint(key, (share,) + shape[1:], 0, _GRID,
                                   jnp.int32), start, shape[0])
        else:
            bits = jax.random.randint(key, shape, 0, _GRID, jnp.int32)
        return bits.astype(jnp.float32) / _GRID

    def normal(self, shape):
        """Standard normal by Box-Muller from two uniforms."""
        radius_u = (self.uniform(shape) * _GRID + 0.5) / _GRID
        angle_u = self.uniform(shape)
        return jnp.sqrt(-2.0 * jnp.log(radius_u)) * jnp.cos(
            2.0 * np.pi * angle_u)


_GRID = 2**24


class SophiaTrainStep(RestoresCompile):
    """Mixin that refreshes Sophia's Hessian estimate inside `fit` (JAX).

    Used exactly as on TensorFlow (`class LM(SophiaTrainStep,
    keras.Model)`): on steps where `iterations % k == 0` the optimizer's
    estimator refreshes `h` from the step's own forward pass, then the
    ordinary update runs; the logs gain `win_rate`, `hessian_norm`,
    `skipped_steps` and `skipped_refreshes` (docs/jax.md). With an
    optimizer other than `Sophia` the step is Keras's own.
    """

    def train_step(self, state, data):
        sophia = self.optimizer
        _check_supported(sophia)
        if not isinstance(sophia, Sophia) or not self.trainable_weights:
            return super().train_step(state, data)
        trainable, non_trainable, optimizer_values, metrics_values = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        iterations, is_refresh = _read(
            sophia, optimizer_values,
            lambda: (sophia.iterations.value, sophia.should_refresh_hessian()))

        loss_and_output = _loss_and_output(
            self, non_trainable, metrics_values, optimizer_values, x, y,
            sample_weight)

        def refresh(optimizer_values):
            key = _step_key(sophia.seed, iterations)
            aux, grads, (sums, count) = _gather(
                self, sophia, loss_and_output, trainable, x, y,
                sample_weight, key)
            estimates = sophia.estimator.finalize(sums, count)
            # The one h update and the one count of a skipped refresh
            # are Sophia's own methods, run on these values.
            new = jax.lax.cond(
                _all_finite(list(grads) + list(sums)),
                lambda values: _assigned(
                    sophia, values, lambda: sophia.update_hessian(
                        estimates, self.trainable_variables)),
                lambda values: _assigned(sophia, values,
                                         sophia.count_skipped_refresh),
                optimizer_values)
            return aux, grads, new

        def with_metrics(branch):
            # The metrics are updated inside each branch, so that only
            # scalars leave it, not the batch's output (logits-sized).
            def run(optimizer_values):
                aux, grads, optimizer_values = branch(optimizer_values)
                loss, y_pred, non_trainable, metrics_values = aux
                logs, metrics_values = keras_internals.update_metrics(
                    self, metrics_values, loss, x, y, y_pred, sample_weight)
                return (logs, non_trainable, metrics_values, grads,
                        optimizer_values)
            return run

        def ordinary(optimizer_values):
            return (*_training_pass(trainable, loss_and_output),
                    list(optimizer_values))

        logs, non_trainable, metrics_values, grads, optimizer_values = (
            jax.lax.cond(is_refresh, with_metrics(refresh),
                         with_metrics(ordinary), optimizer_values))
        # A NaN or Inf gradient never reaches m or the weights: the step
        # is skipped and counted (a refresh on it left h alone).
        finite = _all_finite(grads)
        trainable, optimizer_values = jax.lax.cond(
            finite,
            lambda values: sophia.stateless_apply(values, grads, trainable),
            lambda values: (list(trainable), list(values)),
            optimizer_values)
        optimizer_values = _assigned(
            sophia, optimizer_values, lambda: sophia.skipped_steps.assign_add(
                jnp.where(finite, 0, 1).astype(sophia.skipped_steps.dtype)))
        optimizer_values = jax.lax.cond(
            is_refresh,
            lambda values: _assigned(sophia, values,
                                     sophia.update_diagnostics),
            lambda values: values, optimizer_values)
        # As of the last refresh step, as on TensorFlow.
        logs.update(_read(sophia, optimizer_values, lambda: {
            name: getattr(sophia, name).value
            for name in ("win_rate", "hessian_norm", "skipped_steps",
                         "skipped_refreshes")}))
        return logs, (trainable, non_trainable, optimizer_values,
                      metrics_values)


def _loss_and_output(model, non_trainable, metrics, optimizer_values, x, y,
                     sample_weight):
    """`f(values, x, y, sample_weight) -> ((scaled loss, output), aux)`:
    Keras's training loss of the batch (by default this step's) at the
    trainable `values`, with the output beside it so that one `jax.vjp`
    gives both pullbacks; `aux` is `compute_loss_and_updates`'s."""
    def loss_and_output(values, x=x, y=y, sample_weight=sample_weight):
        loss, aux = model.compute_loss_and_updates(
            values, non_trainable, metrics, x, y, sample_weight,
            training=True, optimizer_variables=optimizer_values)
        return (loss, aux[1]), aux
    return loss_and_output


def _training_pass(trainable, loss_and_output):
    """Keras's own step: `(aux, grads)`, the loss, its gradient and the
    output, once."""
    def loss(values):
        (scaled, _), aux = loss_and_output(values)
        return scaled, aux

    (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    return aux, grads


def _gather(model, sophia, loss_and_output, trainable, x, y, sample_weight,
            key):
    """`(aux, grads, (sums, count))` of a refresh step: the training pass
    and the estimator's statistics, as `refresh.gather` on TensorFlow. On
    the whole batch in one chunk the estimator shares the step's forward
    pass; otherwise the pass is Keras's own and the estimator runs on the
    leading share of the batch in `hessian_chunks` chunks, each with a
    forward pass of its own, in a loop of one chunk at a time."""
    fraction = sophia.hessian_batch_fraction
    share = max(int(fraction * jax.tree.leaves(x)[0].shape[0]), 1)
    chunks = sophia.chunks_for(share)
    if fraction == 1.0 and chunks == 1:
        (loss, y_pred), pullback, aux = jax.vjp(
            loss_and_output, trainable, has_aux=True)
        (grads,) = pullback((jnp.ones_like(loss),
                             jax.tree.map(jnp.zeros_like, y_pred)))
        context = _chunk_context(model, (x, y, sample_weight), y_pred,
                                 pullback, loss, loss_and_output,
                                 trainable, key, grads=grads)
        return aux, grads, sophia.estimator.statistics(context)
    aux, grads = _training_pass(trainable, loss_and_output)
    size = share // chunks
    # Which statistics the estimator leaves None, known once the loop has
    # traced its body (as on TensorFlow).
    missing = []

    def body(k, carry):
        sums, count, ready = carry
        start = k * size
        part = jax.tree.map(
            lambda t: None if t is None else jax.lax.dynamic_slice_in_dim(
                t, start, size), (x, y, sample_weight))
        (loss, y_pred), pullback, _ = jax.vjp(
            lambda values: loss_and_output(values, *part), trainable,
            has_aux=True)
        context = _chunk_context(model, part, y_pred, pullback, loss,
                                 loss_and_output, trainable, key,
                                 rows=(start, share))
        chunk_sums, chunk_count = sophia.estimator.statistics(context)
        missing[:] = [c is None for c in chunk_sums]
        sums = [s if c is None else s + jnp.asarray(c, jnp.float32)
                for s, c in zip(sums, chunk_sums)]
        return sums, count + jnp.asarray(chunk_count, jnp.float32), ready

    # One chunk at a time, after the training pass (the loop carries its
    # gradients, so it cannot start before them).
    zeros = [jnp.zeros(v.shape, jnp.float32) for v in trainable]
    sums, count, _ = jax.lax.fori_loop(
        0, chunks, body, (zeros, jnp.float32(0.0), grads))
    return aux, grads, ([None if m else s for m, s in zip(missing, sums)],
                        count)


def _chunk_context(model, part, y_pred, pullback, loss, loss_and_output,
                   trainable, key, grads=None, rows=None):
    """The estimator context of one chunk `part` = (x, y, sample_weight)
    from its pass's `pullback`; its gradient is `grads`, or one more
    backward pass when asked for."""
    def loss_of(values):
        return loss_and_output(values, *part)[0][0]

    def output_pullback(cotangents):
        return pullback((jnp.zeros_like(loss), cotangents))[0]

    if grads is None:
        def grads():
            return pullback((jnp.ones_like(loss),
                             jax.tree.map(jnp.zeros_like, y_pred)))[0]

    return EstimatorContext(model, *part, y_pred, grads, output_pullback,
                            loss_of, trainable, key, rows=rows)


def _read(optimizer, values, fn):
    """`fn()` with the optimizer's variables read from `values`."""
    mapping = list(zip(optimizer.variables, values))
    with keras.StatelessScope(state_mapping=mapping):
        return fn()


def _assigned(optimizer, values, fn):
    """The optimizer's state after `fn()` assigned to it, from `values`."""
    mapping = list(zip(optimizer.variables, values))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        fn()
    new = [scope.get_current_value(v) for v in optimizer.variables]
    return [value if n is None else n for n, value in zip(new, values)]


def _step_key(seed, iterations):
    """The random key of a refresh step: a pure function of the
    optimizer's seed and the step counter, as on TensorFlow."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), iterations)


def _all_finite(tensors):
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(t)) for t in tensors
                              if t is not None]))


def _check_supported(optimizer):
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not isinstance(inner, Sophia):
        return
    if inner is not optimizer or inner.loss_scale_factor is not None:
        raise ValueError(
            "Loss scaling (LossScaleOptimizer, loss_scale_factor) with "
            "Sophia is not supported on the JAX backend yet. Use "
            "mixed_precision 'mixed_bfloat16' (no loss scaling) or the "
            "TensorFlow backend.")
    if inner.gradient_accumulation_steps:
        raise ValueError(
            "gradient_accumulation_steps with Sophia is not supported on "
            "the JAX backend yet. Received: gradient_accumulation_steps="
            f"{inner.gradient_accumulation_steps}")


def estimate_hessian(model, x, y=None, sample_weight=None, estimator=None,
                     seed=0):
    """One Hessian-diagonal estimate on one batch, outside of `fit` (JAX;
    see `keras_sophia.train_step.estimate_hessian`)."""
    if estimator is None:
        if not isinstance(model.optimizer, Sophia):
            raise ValueError(
                "Pass `estimator=` or compile the model with a Sophia "
                f"optimizer. Received: optimizer={model.optimizer!r}")
        estimator = model.optimizer.estimator
    estimator = estimators_lib.get(estimator)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    metrics = [v.value for v in model.metrics_variables]
    optimizer = [v.value for v in model.optimizer.variables]

    loss_and_output = _loss_and_output(model, non_trainable, metrics,
                                       optimizer, x, y, sample_weight)

    (loss, y_pred), pullback, _ = jax.vjp(loss_and_output, trainable,
                                          has_aux=True)
    context = _chunk_context(model, (x, y, sample_weight), y_pred, pullback,
                             loss, loss_and_output, trainable,
                             _step_key(seed, 0))
    sums, count = estimator.statistics(context)
    return estimator.finalize(sums, count)
