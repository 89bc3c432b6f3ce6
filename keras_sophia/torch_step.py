"""The Hessian-refreshing `train_step` on Keras's torch backend:
`torch.autograd.grad` and eager control flow for the one refresh sequence
(`refresh.py`).

Keras's torch trainer runs each step eagerly, one device per process
(Keras offers no distribution on torch), so `cond` and `loop` are Python
and nothing is combined over replicas. Hutchinson's `hvp` differentiates
the recorded training gradient once more (double backward), so a pass
that may serve it keeps the backward graph (`create_graph=True`) and runs
its attention on PyTorch's math kernel: the fused ones (flash,
memory-efficient) have no derivative of their backward pass. GNB's
passes (`HessianEstimator.uses_hvp` False) keep neither.

Not supported on torch yet, each refused with a `ValueError` naming it:
loss scaling (`LossScaleOptimizer`, `loss_scale_factor`) and gradient
accumulation.
"""

import contextlib

import keras
import numpy as np
import torch
from torch.nn.attention import SDPBackend
from torch.nn.attention import sdpa_kernel
from keras import ops
from keras import tree

from keras_sophia import keras_internals
from keras_sophia import refresh
from keras_sophia.context import GRID
from keras_sophia.context import EstimatorContext
from keras_sophia.primitives import Primitives
from keras_sophia.saving import RestoresCompile
from keras_sophia.sophia import Sophia


class SophiaTrainStep(RestoresCompile):
    """Mixin that refreshes Sophia's Hessian estimate inside `fit` (torch).

    Used exactly as on TensorFlow (`class LM(SophiaTrainStep,
    keras.Model)`), with the same sequence (`keras_sophia.refresh`) and
    the same logs (docs/backends.md). With an optimizer other than
    `Sophia` the step is Keras's own.
    """

    def train_step(self, data):
        sophia = self.optimizer
        refresh.check_supported(sophia, "torch")
        if not isinstance(sophia, Sophia) or not self.trainable_weights:
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return refresh.train_step(Torch(self), sophia, x, y, sample_weight)


class Torch(Primitives):
    """torch's primitives: eager, on one device."""

    def forward_backward(self, batch, track_loss=True):
        y_pred, loss = self._loss(batch, track_loss)
        grads = torch.autograd.grad(loss, self._params(), allow_unused=True)
        return y_pred, list(grads)

    def shared_pass(self, batch, seed, track_loss=True, second_order=True):
        with _attention(second_order):
            y_pred, loss = self._loss(batch, track_loss)
        # The forward graph stays for the estimator's products through the
        # output; the gradient's own backward graph only for `hvp`.
        recorded = torch.autograd.grad(loss, self._params(),
                                       create_graph=second_order,
                                       retain_graph=True, allow_unused=True)
        grads = [None if g is None else g.detach() for g in recorded]
        return y_pred, grads, TorchContext(self.model, *batch, y_pred,
                                           self.variables, recorded, seed)

    def chunk_context(self, part, seed, rows, second_order=True):
        # In a scope of its own: what the pass assigns (BatchNormalization's
        # moving statistics, seed generators) is dropped with it.
        scope = keras.StatelessScope(collect_losses=True)
        with scope, _attention(second_order):
            y_pred = self.model(part[0], training=True)

        # The chunk's own training gradient, built on first use (GNB never
        # asks): one backward pass through the chunk.
        def grads():
            with scope:
                _, loss = self._loss(part, False, y_pred=y_pred)
            return torch.autograd.grad(loss, self._params(),
                                       create_graph=second_order,
                                       retain_graph=True, allow_unused=True)

        return TorchContext(self.model, *part, y_pred, self.variables, grads,
                            seed, rows=rows)

    def cond(self, pred, true_fn, false_fn):
        return true_fn() if bool(pred) else false_fn()

    def loop(self, n, body, init):
        carry = init
        for k in range(int(n)):
            carry = body(k, carry)
        return carry

    def all_finite(self, tensors):
        return ops.all(ops.stack([ops.all(ops.isfinite(t))
                                  for t in tensors if t is not None]))

    def step_seed(self, seed, iterations):
        return int(seed), int(iterations)

    def apply(self, grads):
        with torch.no_grad():
            super().apply(grads)

    def _params(self):
        return [v.value for v in self.variables]

    def _loss(self, batch, track_loss, y_pred=None):
        """Keras's forward pass (unless `y_pred` is given) and scaled
        loss, as `TorchTrainer.train_step` computes them."""
        x, y, sample_weight = batch
        if y_pred is None:
            y_pred = self.model(x, training=True)
        loss = refresh.compute_loss(self.model, x, y, sample_weight, y_pred)
        if track_loss:
            keras_internals.track_loss(self.model, loss, x)
        return y_pred, self.model.optimizer.scale_loss(loss)


class TorchContext(EstimatorContext):
    """`EstimatorContext` from torch autograd: `recorded` is the training
    gradient with its backward graph (or a function that makes it on
    first use), `seed` = (optimizer seed, step)."""

    def __init__(self, model, x, y, sample_weight, y_pred, variables,
                 recorded, seed, rows=None):
        super().__init__(model, x, y, sample_weight, y_pred, variables, rows)
        self._params = [v.value for v in variables]
        self._recorded, self._seed = recorded, seed

    @property
    def grads(self):
        return [None if g is None else ops.cast(g.detach(), "float32")
                for g in self._recorded_grads()]

    def vjp(self, cotangents):
        # In the output's dtype (bfloat16 under mixed precision).
        cotangents = tree.map_structure(lambda c, y: ops.cast(c, y.dtype),
                                        cotangents, self.y_pred)
        return self._grad(tree.flatten(self.y_pred),
                          tree.flatten(cotangents))

    def hvp(self, vectors):
        # d/dθ <grad(θ), v> = H v, reverse over reverse.
        pairs = [(g, ops.cast(v, g.dtype))
                 for g, v in zip(self._recorded_grads(), vectors)
                 if g is not None]
        return self._grad([g for g, _ in pairs], [v for _, v in pairs])

    def _grad(self, outputs, cotangents):
        products = torch.autograd.grad(outputs, self._params,
                                       grad_outputs=cotangents,
                                       retain_graph=True, allow_unused=True)
        return [None if p is None else ops.cast(p, "float32")
                for p in products]

    def _bits(self, shape, draw):
        # A generator seeded from (seed, step, draw): the same numbers
        # after a resume, on any device (drawn on the CPU, then moved).
        seed, step = self._seed
        state = np.random.SeedSequence([seed, step, draw]).generate_state(
            1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        bits = torch.randint(0, GRID, tuple(int(s) for s in shape),
                             generator=generator, dtype=torch.int32)
        return ops.convert_to_tensor(bits)

    def _recorded_grads(self):
        if callable(self._recorded):
            self._recorded = self._recorded()
        return self._recorded


def _attention(second_order):
    """Where `second_order`, attention on PyTorch's math kernel, whose
    backward pass has a derivative (Hutchinson's `hvp`); the fused
    kernels' have none. Otherwise whichever kernel torch picks."""
    if second_order:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
