"""Hessian-diagonal estimators for Sophia (arXiv 2305.14342, Section 2.3).

An estimator turns one batch into one tensor per trainable variable whose
expectation is (an approximation of) the diagonal of the Hessian of the
training loss. It is written with `keras.ops` against the
`keras_sophia.EstimatorContext` that `keras_sophia.SophiaTrainStep` builds
on refresh steps, so the forward and backward passes of the training step
are shared, not repeated: the context gives the model, the batch, `y_pred`,
the variables and their gradients, `vjp`, `hvp` and random draws, and
documents what each costs.

Under `tf.distribute` each replica sees its own share of the batch. So an
estimator works in two stages: `statistics(context)` returns a list of
per-variable *sums* and a scalar *count* for this replica's share; the train
step adds both across replicas; `finalize(sums, count)` turns the totals
into the estimate. The default `finalize` is the mean `sums / count`, so an
estimator that estimates the Hessian of its batch's mean loss returns
`(estimates * context.examples, context.examples)`: its estimates are then
averaged over replicas, and over the chunks of a chunked refresh
(`Sophia(hessian_chunks=...)`, which sums chunks as it sums replicas),
each weighed by its share of the examples.

A plain callable `fn(context) -> estimates` is accepted wherever an
estimator is, and is averaged in the same way.
"""

import abc

import keras
from keras import ops


class HessianEstimator(abc.ABC):
    """Base class of Hessian-diagonal estimators (see the module docstring).

    Subclasses implement `statistics` and, where the replica statistics are
    not simply averaged, `finalize`.
    """

    # Whether `statistics` may call `context.hvp`, a second derivative:
    # a backend keeps what that needs (torch: the backward graph and a
    # twice-differentiable attention kernel) only where it is True.
    uses_hvp = True

    @abc.abstractmethod
    def statistics(self, context):
        """Returns `(sums, count)` for this replica's share of the batch."""

    def finalize(self, sums, count):
        """Turns the cross-replica totals into one estimate per variable."""
        return [None if s is None else s / count for s in sums]

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_sophia")
class GaussNewtonBartlett(HessianEstimator):
    """Gauss-Newton-Bartlett estimator (Sophia-G; paper Algorithm 2).

    Samples labels `y_hat ~ softmax(logits)` from the model's own output,
    takes the gradient `g_hat` of the mean cross-entropy on the sampled
    labels over the `B` loss terms, and returns `B * g_hat * g_hat`, which
    is never negative. Terms with zero sample weight (and, for a sparse
    loss, labels equal to `ignore_class`) are left out of both the sum and
    `B`. Requires a model compiled with a (sparse) categorical
    cross-entropy loss; `from_logits` is honoured.
    """

    # One vector-Jacobian product through the output: first order.
    uses_hvp = False

    def statistics(self, context):
        sparse, from_logits, ignore_class = _cross_entropy_kind(context.model)
        y_pred = context.y_pred
        if isinstance(y_pred, (list, tuple, dict)):
            raise ValueError(
                "The 'gnb' estimator supports single-output models; this "
                f"model returns {len(y_pred)} outputs. Use "
                "estimator='hutchinson'."
            )
        # (..., vocab): probabilities in float32, whatever the model dtype.
        scores = ops.cast(y_pred, "float32")
        probs = ops.softmax(scores, axis=-1) if from_logits else scores
        # One uniform per loss term, the batch's rows of one draw over the
        # Hessian share, so a chunked refresh samples the same labels.
        uniform = context.uniform(ops.shape(probs)[:-1], per_example=True)
        labels = _sample_labels(probs, uniform)
        weights = _term_weights(context, labels, sparse, ignore_class)
        cotangent = _sampled_ce_cotangent(probs, labels, weights, from_logits)
        # The sum over terms of the sampled-label gradients, i.e. B * g_hat.
        sums = context.vjp(cotangent)
        if weights is None:
            return sums, ops.cast(ops.size(labels), "float32")
        return sums, ops.sum(weights)

    def finalize(self, sums, count):
        # B * g_hat^2 with g_hat = sums / B; B = 0 (all masked) gives 0.
        count = ops.maximum(count, 1.0)
        return [None if s is None else ops.square(s) / count for s in sums]


@keras.saving.register_keras_serializable(package="keras_sophia")
class Hutchinson(HessianEstimator):
    """Hutchinson estimator `u * (H u)` (Sophia-H; paper Algorithm 1).

    Unbiased for the Hessian diagonal of the training loss; individual
    entries can be negative. `H u` is one Hessian-vector product, made by
    differentiating the training gradient of the same step a second time.

    Args:
        distribution: `"rademacher"` (entries +1 or -1) or `"normal"`
            (standard Gaussian). Defaults to `"rademacher"`.
        num_samples: Number of probes `u` averaged per refresh (one extra
            backward pass each). Defaults to `1`.
    """

    def __init__(self, distribution="rademacher", num_samples=1):
        if distribution not in ("rademacher", "normal"):
            raise ValueError(
                "Argument `distribution` must be 'rademacher' or 'normal'. "
                f"Received: distribution={distribution!r}"
            )
        if (
            isinstance(num_samples, bool)
            or not isinstance(num_samples, int)
            or num_samples < 1
        ):
            raise ValueError(
                "Argument `num_samples` must be an integer >= 1. "
                f"Received: num_samples={num_samples!r}"
            )
        self.distribution = distribution
        self.num_samples = num_samples

    def probes(self, context):
        """One random probe per variable, with the variable's shape."""
        probes = []
        for variable in context.variables:
            shape = tuple(variable.shape)
            if self.distribution == "normal":
                probes.append(context.normal(shape))
            else:
                # floor(2u) is 0 or 1 with equal odds; map to -1 or +1.
                bits = ops.floor(2.0 * context.uniform(shape))
                probes.append(2.0 * bits - 1.0)
        return probes

    def statistics(self, context):
        total = None
        for _ in range(self.num_samples):
            probes = self.probes(context)
            products = context.hvp(probes)
            sample = [
                None if hu is None else u * hu
                for u, hu in zip(probes, products)
            ]
            total = sample if total is None else [
                None if t is None else t + s for t, s in zip(total, sample)
            ]
        # The mean over this batch, weighed by its examples against other
        # chunks and replicas: H of the mean loss over all of them.
        weight = context.examples / self.num_samples
        return [None if t is None else t * weight for t in total], (
            context.examples)

    def get_config(self):
        return {
            "distribution": self.distribution,
            "num_samples": self.num_samples,
        }


@keras.saving.register_keras_serializable(package="keras_sophia")
class FunctionEstimator(HessianEstimator):
    """Wraps a callable `fn(context) -> estimates`; replicas are averaged."""

    def __init__(self, fn):
        self.fn = fn

    def statistics(self, context):
        # Weighed by examples, as Hutchinson's (chunks may differ by one).
        return [None if e is None else e * context.examples
                for e in self.fn(context)], context.examples

    def get_config(self):
        return {"fn": keras.saving.serialize_keras_object(self.fn)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["fn"]))


_BY_NAME = {"gnb": GaussNewtonBartlett, "hutchinson": Hutchinson}


def get(identifier):
    """Resolves `"gnb"`, `"hutchinson"`, an estimator or a callable."""
    if isinstance(identifier, HessianEstimator):
        return identifier
    if isinstance(identifier, str):
        if identifier.lower() not in _BY_NAME:
            raise ValueError(
                "Argument `estimator` must be 'gnb', 'hutchinson', a "
                "`keras_sophia.estimators.HessianEstimator` or a callable "
                "`fn(context) -> estimates`. "
                f"Received: estimator={identifier!r}"
            )
        return _BY_NAME[identifier.lower()]()
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if callable(identifier):
        return FunctionEstimator(identifier)
    raise ValueError(
        "Argument `estimator` must be 'gnb', 'hutchinson', a "
        "`keras_sophia.estimators.HessianEstimator` or a callable. "
        f"Received: estimator={identifier!r}"
    )


def _cross_entropy_kind(model):
    """(sparse, from_logits, ignore_class) of the model's compiled loss."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        config = loss.get_config()
        return True, config["from_logits"], config.get("ignore_class")
    if isinstance(loss, keras.losses.CategoricalCrossentropy):
        return False, loss.get_config()["from_logits"], None
    by_name = {
        "sparse_categorical_crossentropy": True,
        "categorical_crossentropy": False,
    }
    name = loss if isinstance(loss, str) else getattr(loss, "__name__", None)
    if name in by_name:
        return by_name[name], False, None
    raise ValueError(
        "The 'gnb' (Gauss-Newton-Bartlett) estimator samples labels from "
        "the model's predicted distribution, so the model must be compiled "
        "with a (sparse) categorical cross-entropy loss. Received: "
        f"loss={loss!r}. For any other loss use estimator='hutchinson'."
    )


def _sample_labels(probs, uniform):
    """Inverse-CDF sampling, one uniform per term, in two levels.

    A cumulative sum over a 50k vocabulary is slow on CPU (and
    `categorical` is slower still under XLA), so the classes are cut into
    `blocks` of `width`: pick the block from the cumulative block sums,
    then the class from the cumulative sum inside that block only.

    probs: (..., classes); uniform: (...). Returns int32 labels (...).
    """
    classes = probs.shape[-1]
    blocks, width = _blocking(classes)
    lead = ops.shape(probs)[:-1]
    flat = ops.reshape(probs, (-1, classes))  # (terms, classes)
    u = ops.reshape(uniform, (-1, 1))  # (terms, 1)
    tiles = ops.reshape(flat, (-1, blocks, width))
    block_mass = ops.sum(tiles, axis=-1)  # (terms, blocks)
    block_cdf = ops.cumsum(block_mass, axis=-1)
    block = ops.minimum(
        ops.sum(ops.cast(block_cdf < u, "int32"), axis=-1), blocks - 1
    )  # (terms,)
    # Row `block` of each term's tiles, (terms, width). A flat `take` is a
    # plain gather; `take_along_axis` here costs as much as the softmax.
    rows = ops.arange(ops.shape(tiles)[0], dtype="int32") * blocks + block
    chosen = ops.take(ops.reshape(tiles, (-1, width)), rows, axis=0)
    # Mass of the blocks before the chosen one, then the CDF inside it.
    offset = ops.take_along_axis(block_cdf, block[:, None], axis=1)
    offset = offset - ops.take_along_axis(block_mass, block[:, None], axis=1)
    inner_cdf = offset + ops.cumsum(chosen, axis=-1)  # (terms, width)
    inner = ops.minimum(
        ops.sum(ops.cast(inner_cdf < u, "int32"), axis=-1), width - 1
    )
    return ops.reshape(block * width + inner, lead)


def _blocking(classes):
    """(blocks, width) with blocks * width == classes, width the largest
    divisor of `classes` up to classes / 16 (1733 for GPT-2's 50,257 =
    29 * 1733). A copy to pad the class axis would cost more than the
    cumulative sums it saves. For a large prime vocabulary this falls back
    to one cumulative sum over all classes: correct, only slower."""
    width = max(classes // 16, 1)
    while classes % width:
        width -= 1
    return classes // width, width


def _sampled_ce_cotangent(probs, labels, weights, from_logits):
    """d CE(y_pred, y_hat) / d y_pred summed over the counted terms.

    For logits z it is softmax(z) - onehot(y_hat), for probabilities p it
    is -onehot(y_hat) / p: each differs from `probs` (or from zero) at the
    sampled class only, so one scatter replaces building a one-hot tensor
    as large as the logits. probs: (..., classes); labels, weights: (...).
    """
    classes = probs.shape[-1]
    flat = ops.reshape(probs, (-1, classes))  # (terms, classes)
    positions = _label_positions(ops.reshape(labels, (-1,)))  # (terms, 2)
    at_label = ops.take_along_axis(flat, positions[:, 1:], axis=1)[:, 0]
    w = 1.0 if weights is None else ops.reshape(weights, (-1,))
    if from_logits:
        if weights is not None:
            flat = flat * ops.expand_dims(w, -1)
        cotangent = ops.scatter_update(flat, positions, w * (at_label - 1.0))
    else:
        values = -w / ops.maximum(at_label, keras.config.epsilon())
        cotangent = ops.scatter(positions, values, ops.shape(flat))
    return ops.reshape(cotangent, ops.shape(probs))


def _label_positions(labels):
    """`(term, class)` of each term's sampled class in the (terms, classes)
    scores, int32. Each coordinate stays below its own axis's length: a
    flat index `term * classes + class` would pass 2**31 at 42,700 GPT-2
    tokens, and JAX (without x64) truncates an int64 request to int32.
    labels: (terms,)."""
    terms = ops.arange(ops.shape(labels)[0], dtype="int32")
    return ops.stack([terms, ops.cast(labels, "int32")], axis=1)


def _term_weights(context, labels, sparse, ignore_class):
    """1.0 for each loss term that counts, 0.0 for masked ones, shaped like
    `labels`; None when every term counts (saves a pass over the logits)."""
    sample_weight = context.sample_weight
    masked = sparse and ignore_class is not None
    if sample_weight is None and not masked:
        return None
    weights = ops.ones(ops.shape(labels), "float32")
    if sample_weight is not None:
        sample_weight = ops.cast(ops.not_equal(sample_weight, 0), "float32")
        if len(sample_weight.shape) > len(labels.shape):  # e.g. (batch, 1)
            sample_weight = ops.reshape(sample_weight, ops.shape(labels))
        while len(sample_weight.shape) < len(labels.shape):
            sample_weight = ops.expand_dims(sample_weight, -1)
        weights = weights * sample_weight
    if masked:
        y = ops.reshape(context.y, ops.shape(labels))
        weights = weights * ops.cast(ops.not_equal(y, ignore_class), "float32")
    return weights
