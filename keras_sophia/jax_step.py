"""The Hessian-refreshing `train_step` on Keras's JAX backend: `jax.vjp`,
`jax.lax.cond`, `jax.lax.fori_loop` and `jax.random` for the one refresh
sequence (`refresh.py`).

Keras's JAX trainer is stateless (`train_step(state, data)` returns new
values instead of assigning), so the step runs the sequence inside a
`keras.StatelessScope` over the state's values, and `JAX.cond` carries
them through both branches of a `jax.lax.cond`. One compiled step holds
both branches on `iterations % k == 0`. On several devices
(`keras.distribution`) the step is one program over the global batch, so
an estimator's sums and counts already cover every device and nothing is
combined by hand.

Not supported on JAX yet, each refused with a `ValueError` naming it:
loss scaling (`LossScaleOptimizer`, `loss_scale_factor`) and gradient
accumulation.
"""

import jax
import jax.numpy as jnp
import keras

from keras_sophia import keras_internals
from keras_sophia import refresh
from keras_sophia.context import GRID
from keras_sophia.context import EstimatorContext
from keras_sophia.primitives import Primitives
from keras_sophia.saving import RestoresCompile
from keras_sophia.sophia import Sophia


class SophiaTrainStep(RestoresCompile):
    """Mixin that refreshes Sophia's Hessian estimate inside `fit` (JAX).

    Used exactly as on TensorFlow (`class LM(SophiaTrainStep,
    keras.Model)`), with the same sequence (`keras_sophia.refresh`): on
    steps where `iterations % k == 0` the optimizer's estimator refreshes
    `h`, then the ordinary update runs; the logs gain `win_rate`,
    `hessian_norm`, `skipped_steps` and `skipped_refreshes`
    (docs/backends.md). With an optimizer other than `Sophia` the step is
    Keras's own.
    """

    def train_step(self, state, data):
        sophia = self.optimizer
        refresh.check_supported(sophia, "JAX")
        if not isinstance(sophia, Sophia) or not self.trainable_weights:
            return super().train_step(state, data)
        groups = (self.trainable_variables, self.non_trainable_variables,
                  sophia.variables, self.metrics_variables)
        variables = [v for group in groups for v in group]
        values = [value for group in state for value in group]
        with keras.StatelessScope(
                state_mapping=list(zip(variables, values))) as scope:
            logs = refresh.train_step(
                JAX(self, variables), sophia,
                *keras.utils.unpack_x_y_sample_weight(data))
        new = iter(_current(scope, variables, values))
        return logs, tuple([next(new) for _ in group] for group in groups)


class JAX(Primitives):
    """JAX's primitives; `state` lists the variables the step's state
    holds (`cond` carries their values), None outside a step."""

    def __init__(self, model, state=None):
        super().__init__(model)
        self.state = state

    def forward_backward(self, batch, track_loss=True):
        (_, aux), grads = jax.value_and_grad(
            self._loss(batch), has_aux=True)(self._values())
        self._keep(aux, batch[0], track_loss)
        return aux[1], grads

    def shared_pass(self, batch, seed, track_loss=True, second_order=True):
        # `jax.vjp` keeps what the pullback needs, and Hutchinson's
        # product is a pass of its own: `second_order` changes nothing.
        (loss, y_pred), pullback, aux = jax.vjp(
            _with_output(self._loss(batch)), self._values(), has_aux=True)
        (grads,) = pullback((jnp.ones_like(loss),
                             jax.tree.map(jnp.zeros_like, y_pred)))
        self._keep(aux, batch[0], track_loss)
        return y_pred, grads, self._context(batch, seed, pullback, loss,
                                            y_pred, grads=grads)

    def chunk_context(self, part, seed, rows, second_order=True):
        (loss, y_pred), pullback, _ = jax.vjp(
            _with_output(self._loss(part)), self._values(), has_aux=True)
        return self._context(part, seed, pullback, loss, y_pred, rows=rows)

    def cond(self, pred, true_fn, false_fn):
        def run(fn):
            def branch(values):
                with keras.StatelessScope(
                        state_mapping=list(zip(self.state, values))) as scope:
                    out = fn()
                return out, _current(scope, self.state, values)
            return branch

        out, values = jax.lax.cond(pred, run(true_fn), run(false_fn),
                                   [v.value for v in self.state])
        for variable, value in zip(self.state, values):
            variable.assign(value)
        return out

    def loop(self, n, body, init):
        return jax.lax.fori_loop(0, n, body, init)

    def all_finite(self, tensors):
        return jnp.all(jnp.array([jnp.all(jnp.isfinite(t)) for t in tensors
                                  if t is not None]))

    def step_seed(self, seed, iterations):
        return jax.random.fold_in(jax.random.PRNGKey(seed), iterations)

    def _values(self):
        return [v.value for v in self.variables]

    def _loss(self, batch):
        """`f(values) -> (scaled loss, aux)`: Keras's training loss of
        `batch` at the trainable `values`, the rest of the state as it is
        now (`compute_loss_and_updates`, as Keras's JAX step)."""
        model = self.model
        state = [[v.value for v in group] for group in (
            model.non_trainable_variables, model.metrics_variables,
            model.optimizer.variables)]

        def loss(values):
            return model.compute_loss_and_updates(
                values, state[0], state[1], *batch, training=True,
                optimizer_variables=state[2])
        return loss

    def _keep(self, aux, x, track_loss):
        """In a train step (`track_loss`): the pass's state updates and its
        loss in the logged `loss`, as Keras's step keeps them."""
        if not track_loss:
            return
        unscaled, _, non_trainable, metrics = aux
        for group, values in ((self.model.non_trainable_variables,
                               non_trainable),
                              (self.model.metrics_variables, metrics)):
            for variable, value in zip(group, values):
                variable.assign(value)
        keras_internals.track_loss(self.model, unscaled, x)

    def _context(self, part, seed, pullback, loss, y_pred, grads=None,
                 rows=None):
        """The estimator context of `part` = (x, y, sample_weight) from
        its pass's `pullback`; its gradient is `grads`, or one more
        backward pass when asked for."""
        if grads is None:
            def grads():
                return pullback((jnp.ones_like(loss),
                                 jax.tree.map(jnp.zeros_like, y_pred)))[0]

        def output_pullback(cotangents):
            return pullback((jnp.zeros_like(loss), cotangents))[0]

        loss_of = _with_output(self._loss(part))
        return JAXContext(self.model, *part, y_pred, self._values(), grads,
                          output_pullback, lambda v: loss_of(v)[0][0], seed,
                          rows=rows)


class JAXContext(EstimatorContext):
    """`EstimatorContext` from `jax.vjp` pullbacks: `pullback(c)` is the
    backward pass of this context's batch with cotangent c on its output,
    `loss_of(values)` its training loss, `key` the step's random key."""

    def __init__(self, model, x, y, sample_weight, y_pred, values, grads,
                 pullback, loss_of, key, rows=None):
        super().__init__(model, x, y, sample_weight, y_pred, values, rows)
        self._grads, self._pullback = grads, pullback
        self._loss_of, self._key = loss_of, key

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
        # Forward over reverse: a pass of its own with tangents.
        vectors = [jnp.asarray(v, w.dtype)
                   for v, w in zip(vectors, self.variables)]
        _, products = jax.jvp(jax.grad(self._loss_of), (self.variables,),
                              (vectors,))
        return [jnp.asarray(p, jnp.float32) for p in products]

    def _bits(self, shape, draw):
        return jax.random.randint(jax.random.fold_in(self._key, draw),
                                  tuple(shape), 0, GRID, jnp.int32)


def _with_output(loss):
    """`loss` returning `((scaled loss, output), aux)`, so that one
    `jax.vjp` gives the pullbacks of both."""
    def both(values):
        scaled, aux = loss(values)
        return (scaled, aux[1]), aux
    return both


def _current(scope, variables, values):
    """The values of `variables` after `scope`'s assignments."""
    new = [scope.get_current_value(v) for v in variables]
    return [value if n is None else n for n, value in zip(new, values)]
