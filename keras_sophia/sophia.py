"""The Sophia optimizer (Liu et al., 2023, arXiv 2305.14342, Algorithm 3)."""

import math
import random
import warnings

import keras
import numpy as np
from keras import ops

from keras_sophia import estimators as estimators_lib
from keras_sophia import keras_internals

_NO_HESSIAN_WARNING = (
    "Sophia is updating weights but no Hessian estimate has reached it: "
    "with h = 0 every step is `lr * sign(momentum)` (sign-momentum), not "
    "Sophia. Train a model that mixes in `keras_sophia.SophiaTrainStep` "
    "(e.g. `class LM(keras_sophia.SophiaTrainStep, keras.Model)`), or in a "
    "custom loop call `optimizer.update_hessian(estimates, variables)` "
    "whenever `optimizer.should_refresh_hessian()` is true, before "
    "`optimizer.apply(...)`."
)


@keras.saving.register_keras_serializable(package="keras_sophia")
class Sophia(keras.optimizers.Optimizer):
    """Sophia: a clipped, diagonal second-order optimizer.

    With `t = iterations` and `k = hessian_update_interval`:

    ```
    if t % k == 0:  h = beta_2 * h + (1 - beta_2) * h_hat   # update_hessian
    m = beta_1 * m + (1 - beta_1) * g
    theta = theta - lr * weight_decay * theta
    theta = theta - lr * clip(m / max(rho * h, epsilon), -1, 1)
    ```

    `h_hat` is a Hessian-diagonal estimate produced by `estimator` and fed
    in by `keras_sophia.SophiaTrainStep` (or by `update_hessian` in a
    custom loop). Neither EMA is bias-corrected, as in the paper. The
    estimate already carries the number of loss terms, so `rho` here is the
    `rho` of the authors' code.

    Args:
        learning_rate: A float, a `LearningRateSchedule`, or a callable
            returning the learning rate. Each coordinate moves by at most
            this much per step. Defaults to `1e-4`.
        beta_1: Decay of the gradient EMA `m`. Defaults to `0.965`.
        beta_2: Decay of the Hessian-diagonal EMA `h`. Defaults to `0.99`.
        rho: Scale of the curvature in the denominator; larger `rho`
            clips fewer coordinates. Defaults to `0.04`.
        epsilon: Floor of the denominator, `max(rho * h, epsilon)`.
            Defaults to `1e-12`.
        weight_decay: Decoupled weight decay, multiplied by the learning
            rate. Defaults to `0.1`.
        hessian_update_interval: `k`; the Hessian estimate is refreshed
            when `iterations % k == 0`. Defaults to `10`.
        hessian_batch_fraction: Share of each (per-replica) batch the
            Hessian is estimated on, in (0, 1]: the first
            `max(1, floor(fraction * batch))` examples. Below 1 the
            estimator runs its own forward pass through that share after
            the training pass (cheaper, noisier). The paper's GPT-2 runs
            used 240 of 480 examples, i.e. 0.5. Defaults to `1.0`.
        hessian_chunks: Number of consecutive chunks the Hessian share is
            cut into on refresh steps (a set number must divide a share
            known when the step is traced), or `"auto"`. The estimator runs
            on one chunk at a time, each with its own forward pass, before
            the step's training pass, and the chunks' statistics are
            summed before the estimate is made: the estimate is the same,
            a chunk's activations and logits are divided by the chunks,
            and more than one chunk adds one parameter-sized sum. With 1
            and the whole batch the estimator instead reuses the training
            pass (fastest; its buffers are then alive beside the training
            gradient). `"auto"` weighs one example's estimator bytes
            (four float32 copies of the model's output: logits, their
            softmax, the sampled cotangent, its gradient) against the
            parameter bytes: `ceil(share * example_bytes /
            parameter_bytes)` chunks, at least 1 (where parameters
            dominate: one pass of its own) and at most 2 for GNB and 8 for
            Hutchinson (the fewest that kept every refresh of the tiny
            GPT-2 within 1.10x AdamW's peak memory, BENCHMARKS.md), 1 for
            other estimators; on a share known when the step is traced,
            the largest divisor of it up to that. Defaults to `"auto"`.
        estimator: `"gnb"` (Gauss-Newton-Bartlett, Sophia-G),
            `"hutchinson"` (Sophia-H), or a `HessianEstimator` instance or
            a callable `fn(context) -> estimates` (see
            `keras_sophia.estimators`). Defaults to `"gnb"`.
        seed: Integer seed of the estimator's random draws, which are
            derived from `(seed, iterations)` so that a resumed run draws
            the same numbers. Defaults to a random integer, fixed at
            construction and saved in the config.
        **kwargs: Base optimizer arguments (`clipnorm`, `global_clipnorm`,
            `clipvalue`, `use_ema`, `ema_momentum`,
            `ema_overwrite_frequency`, `loss_scale_factor`,
            `gradient_accumulation_steps`, `name`).

    Example:

    ```python
    class LM(keras_sophia.SophiaTrainStep, keras.Model):
        pass

    model = LM(inputs, outputs)
    model.compile(optimizer=keras_sophia.Sophia(learning_rate=3e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    model.fit(dataset, epochs=1)
    ```

    References:
        - Liu et al., 2023, "Sophia: A Scalable Stochastic Second-order
          Optimizer for Language Model Pre-training", arXiv 2305.14342.
    """

    def __init__(
        self,
        learning_rate=1e-4,
        beta_1=0.965,
        beta_2=0.99,
        rho=0.04,
        epsilon=1e-12,
        weight_decay=0.1,
        hessian_update_interval=10,
        hessian_batch_fraction=1.0,
        hessian_chunks="auto",
        estimator="gnb",
        seed=None,
        name="sophia",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        _check_float("learning_rate", learning_rate, low=0.0)
        _check_float("beta_1", beta_1, low=0.0, high=1.0)
        _check_float("beta_2", beta_2, low=0.0, high=1.0)
        _check_float("rho", rho, low=0.0, low_inclusive=False)
        _check_float("epsilon", epsilon, low=0.0, low_inclusive=False)
        if weight_decay is not None:
            _check_float("weight_decay", weight_decay, low=0.0)
        if (
            isinstance(hessian_update_interval, bool)
            or not isinstance(hessian_update_interval, int)
            or hessian_update_interval < 1
        ):
            raise ValueError(
                "Argument `hessian_update_interval` must be an integer >= 1. "
                f"Received: hessian_update_interval={hessian_update_interval!r}"
            )
        if (
            isinstance(hessian_batch_fraction, bool)
            or not isinstance(hessian_batch_fraction, (int, float))
            or not 0.0 < hessian_batch_fraction <= 1.0
        ):
            raise ValueError(
                "Argument `hessian_batch_fraction` must be in (0, 1]. "
                f"Received: hessian_batch_fraction={hessian_batch_fraction!r}"
            )
        if hessian_chunks != "auto" and (
            isinstance(hessian_chunks, bool)
            or not isinstance(hessian_chunks, int)
            or hessian_chunks < 1
        ):
            raise ValueError(
                "Argument `hessian_chunks` must be an integer >= 1 or "
                "'auto'. "
                f"Received: hessian_chunks={hessian_chunks!r}"
            )
        if seed is None:
            seed = random.randrange(2**31)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.rho = rho
        self.epsilon = epsilon
        self.hessian_update_interval = hessian_update_interval
        self.hessian_batch_fraction = float(hessian_batch_fraction)
        self.hessian_chunks = hessian_chunks
        self.estimator = estimators_lib.get(estimator)
        self.seed = int(seed)
        # Python-side flag (see `_expect_estimates`); while it is unset, the
        # first update built warns of a missing Hessian source.
        self._hessian_seen = False

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # One slot each per variable (via add_variable_from_reference);
        # None for variables Keras overwrites with their gradient.
        self._momentums, self._hessians = self.add_optimizer_variables(
            var_list, ["momentum", "hessian"]
        )
        # Diagnostics the authors log, refreshed with h (see update_hessian).
        self.win_rate = self.add_variable((), name="win_rate")
        # Named so that `"hessian" in v.name` still finds only the h slots.
        self.hessian_norm = self.add_variable((), name="h_norm")
        # Steps whose gradient held a NaN or Inf; SophiaTrainStep skips
        # them (no change to weights, m, h or iterations) and counts them.
        # The counters are "int" like Keras's `iterations`: int64 on
        # TensorFlow, int32 on JAX, which without x64 truncates an int64
        # request (with a warning) rather than honouring it.
        self.skipped_steps = self.add_variable(
            (), dtype="int", aggregation="only_first_replica",
            name="skipped_steps",
        )
        # Refresh steps whose estimate (or gradient) was not finite: h was
        # left as it was.
        self.skipped_refreshes = self.add_variable(
            (), dtype="int", aggregation="only_first_replica",
            name="skipped_refreshes",
        )

    def should_refresh_hessian(self):
        """Whether this step refreshes `h` (a boolean tensor).

        True when `iterations % hessian_update_interval == 0`. With
        gradient accumulation only the first micro-batch of such an update
        refreshes, so `k` counts optimizer updates, not micro-batches.
        """
        k = self.hessian_update_interval
        refresh = ops.equal(ops.mod(self.iterations, k), 0)
        accumulation = self.gradient_accumulation_steps
        if accumulation:
            first_micro_batch = ops.equal(
                ops.mod(keras_internals.micro_batch_iterations(self),
                        accumulation), 0
            )
            refresh = ops.logical_and(refresh, first_micro_batch)
        return refresh

    def hessian_share(self, batch):
        """`max(1, floor(hessian_batch_fraction * batch))`: the examples
        of a (per-replica) batch of `batch` the Hessian is estimated on."""
        return max(int(self.hessian_batch_fraction * batch), 1)

    def chunks_for(self, share, example_bytes=None, parameter_bytes=None):
        """The chunks a refresh cuts a Hessian share of `share` examples
        into (see `hessian_chunks`); a ValueError if a set number does not
        divide it.

        `share` is a tensor where the batch size is not known when the step
        is traced (`fit` on arrays, a `tf.data` batch without
        `drop_remainder` on TensorFlow); `"auto"` then gives a tensor too.
        `example_bytes` (one example's estimator bytes) and
        `parameter_bytes` (the trainable variables') are what `"auto"`
        weighs; without them it takes its most.
        """
        chunks = self.hessian_chunks
        if chunks == "auto":
            most = _AUTO_MOST.get(type(self.estimator), 1)
            if example_bytes is not None and parameter_bytes:
                # ceil(share * example_bytes / parameter_bytes) in [1, most].
                ratio = example_bytes / parameter_bytes
                if not isinstance(share, int):
                    wanted = ops.ceil(ops.cast(share, "float32") * ratio)
                    return ops.cast(ops.clip(wanted, 1, most), "int32")
                most = min(most, max(1, math.ceil(share * ratio)))
            if not isinstance(share, int):
                return most
            return max(n for n in range(1, most + 1) if share % n == 0)
        # Chunks share one static shape (XLA compiles the loop's body once).
        if isinstance(share, int) and share % chunks:
            raise ValueError(
                f"Argument `hessian_chunks` must divide the {share} "
                "examples per replica that the Hessian is estimated on "
                f"(hessian_batch_fraction={self.hessian_batch_fraction} of "
                "the batch), so that every chunk has the same shape. "
                f"Received: hessian_chunks={chunks}")
        return chunks

    @property
    def shares_training_pass(self):
        """Whether a refresh reuses the training pass (`hessian_chunks=1`
        on the whole batch) instead of passes of its own before it."""
        return self.hessian_chunks == 1 and self.hessian_batch_fraction == 1

    def _expect_estimates(self, variables):
        """Builds Sophia on `variables` if it is not built yet, and notes
        that estimates reach h: from `update_hessian`, and from
        `SophiaTrainStep`'s step, which feeds h on its schedule even when a
        call runs no refresh before its first `apply` (an eager branch,
        after a restore mid-interval). That step reads Sophia's counters
        before `apply`, which would otherwise build it."""
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(variables)
        self._hessian_seen = True

    def update_hessian(self, estimates, variables):
        """EMA of the Hessian diagonal: `h = beta_2 * h + (1 - beta_2) * e`.

        Args:
            estimates: One tensor per variable (same shape), or `None` to
                leave that variable's `h` unchanged.
            variables: The trainable variables, aligned with `estimates`.
                Builds the optimizer on them if it is not built yet.
        """
        variables = list(variables)
        self._expect_estimates(variables)
        for estimate, variable in zip(estimates, variables):
            h = self.hessian_slot(variable)
            # No estimate, or a variable Keras overwrites with its gradient.
            if estimate is None or h is None:
                continue
            self.assign(h, self.hessian_ema(h, estimate))

    def count_skipped_refresh(self):
        """Counts a refresh whose estimate was not finite (h unchanged)."""
        self.skipped_refreshes.assign_add(1)

    def hessian_slot(self, variable):
        """The `h` slot of `variable` (None if Keras overwrites it with its
        gradient)."""
        return self._hessians[keras_internals.variable_index(self, variable)]

    def hessian_ema(self, h, estimate):
        """`beta_2 * h + (1 - beta_2) * estimate`, the new value of `h`.

        Its one caller is `update_hessian`, once per `h` slot. The train
        step calls that method when a refresh's estimate is finite, in
        `refresh.Refresh.commit`, the same on every backend (on several
        TensorFlow replicas once on each replica's copy of `h`, after the
        replicas' statistics are summed; on JAX on the step's state).
        """
        estimate = ops.cast(estimate, h.dtype)
        # Hessian EMA (Alg. 3), no bias correction.
        return self.beta_2 * h + (1.0 - self.beta_2) * estimate

    def update_diagnostics(self):
        """Sets `win_rate`, the fraction of coordinates the last update did
        not clip (|m| < rho * h; healthy at 0.1-0.5 per the authors), and
        `hessian_norm`, ||h||_2.

        `SophiaTrainStep` calls it after the update of each refresh step
        only, so ordinary steps pay nothing; a custom loop may call it after
        `apply` whenever it wants the figures.
        """
        unclipped, size, squares = 0.0, 0, 0.0
        for m, h in zip(self._momentums, self._hessians):
            if h is None:
                continue
            inside = ops.abs(m) < self.rho * h
            unclipped = unclipped + ops.sum(ops.cast(inside, "float32"))
            size += int(np.prod(h.shape))
            squares = squares + ops.sum(ops.square(ops.cast(h, "float32")))
        self.assign(self.win_rate, unclipped / max(size, 1))
        self.assign(self.hessian_norm, ops.sqrt(squares))

    def update_step(self, gradient, variable, learning_rate):
        if not self._hessian_seen:
            warnings.warn(_NO_HESSIAN_WARNING, stacklevel=2)
            self._hessian_seen = True  # once per optimizer is loud enough
        index = keras_internals.variable_index(self, variable)
        m = self._momentums[index]
        h = self._hessians[index]
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        # Gradient EMA (Alg. 3), no bias correction. An embedding's gradient
        # is IndexedSlices, which `*` rejects: ops.multiply keeps it sparse,
        # ops.add with the dense m densifies it (m decays in every row).
        self.assign(
            m,
            ops.add(
                self.beta_1 * m, ops.multiply(gradient, 1.0 - self.beta_1)
            ),
        )
        # Clipped update (Alg. 3). max(), not "+ epsilon": a negative h
        # must still clip, giving a step of lr * sign(m).
        denominator = ops.maximum(self.rho * h, self.epsilon)
        step = ops.clip(m / denominator, -1.0, 1.0)
        self.assign_sub(variable, lr * step)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "rho": self.rho,
                "epsilon": self.epsilon,
                "hessian_update_interval": self.hessian_update_interval,
                "hessian_batch_fraction": self.hessian_batch_fraction,
                "hessian_chunks": self.hessian_chunks,
                "estimator": keras.saving.serialize_keras_object(
                    self.estimator
                ),
                "seed": self.seed,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get("estimator"), dict):
            config["estimator"] = keras.saving.deserialize_keras_object(
                config["estimator"], custom_objects=custom_objects
            )
        return super().from_config(config, custom_objects=custom_objects)


# The most chunks `hessian_chunks="auto"` takes, per estimator.
_AUTO_MOST = {estimators_lib.GaussNewtonBartlett: 2,
              estimators_lib.Hutchinson: 8}


def _check_float(name, value, low, high=None, low_inclusive=True):
    """Raises a ValueError naming `name` unless `value` lies in range.

    Schedules, callables and tensors are checked when they are used.
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    too_low = value < low if low_inclusive else value <= low
    too_high = high is not None and value >= high
    if too_low or too_high or value != value:
        left = "[" if low_inclusive else "("
        allowed = f"in {left}{low}, {high})" if high else (
            f">= {low}" if low_inclusive else f"> {low}"
        )
        raise ValueError(
            f"Argument `{name}` must be {allowed}. Received: {name}={value}"
        )
