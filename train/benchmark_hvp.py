"""What one Hessian-vector product costs next to a training gradient,
made both ways TensorFlow offers, for `train.benchmark` (`--parts hvp`);
the products are checked to exist and agree before they are timed."""

import keras
import numpy as np
import tensorflow as tf

from models import gpt2
from train.benchmark_step import alternate


def hvp_times(settings):
    """Median seconds of one XLA-compiled training gradient, and of the
    gradient with one Hessian-vector product by each of the two ways of
    making it: reverse over reverse (differentiate <grad, v> once more, as
    `EstimatorContext.hvp` does) and forward over reverse (push v through
    the forward and backward pass with `tf.autodiff.ForwardAccumulator`,
    which needs v before the pass starts)."""
    batch, block = settings["batch_size"], settings["block_size"]
    keras.utils.set_random_seed(0)
    model = gpt2.build("tiny", block_size=block)
    variables = model.trainable_variables
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, gpt2.VOCAB_SIZE, size=(batch, block + 1))
    x = {"token_ids": tf.constant(tokens[:, :-1]),
         "padding_mask": tf.ones((batch, block), tf.int32)}
    y = tf.constant(tokens[:, 1:])
    probes = [tf.constant(rng.choice([-1.0, 1.0], size=v.shape), tf.float32)
              for v in variables]

    # The batch and probes are arguments, not captured constants, so XLA
    # cannot fold part of the passes away.
    def loss_of(x, y):
        return loss_fn(y, model(x, training=True))

    @tf.function(jit_compile=True)
    def gradient(x, y, probes):
        with tf.GradientTape() as tape:
            loss = loss_of(x, y)
        return [tf.convert_to_tensor(g)
                for g in tape.gradient(loss, variables)]

    @tf.function(jit_compile=True)
    def reverse_over_reverse(x, y, probes):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_of(x, y)
            grads = [tf.convert_to_tensor(g)
                     for g in inner.gradient(loss, variables)]
        return grads, outer.gradient(grads, variables,
                                     output_gradients=probes)

    @tf.function(jit_compile=True)
    def forward_over_reverse(x, y, probes):
        # The accumulator watches TensorFlow variables: each Keras
        # variable's `.value`.
        with tf.autodiff.ForwardAccumulator(
                [v.value for v in variables], probes) as forward:
            with tf.GradientTape() as tape:
                loss = loss_of(x, y)
            grads = [tf.convert_to_tensor(g)
                     for g in tape.gradient(loss, variables)]
        return grads, forward.jvp(grads)

    checked = check_products(reverse_over_reverse(x, y, probes)[1],
                             forward_over_reverse(x, y, probes)[1])

    def timer(function):
        def run():
            tf.nest.map_structure(
                lambda t: None if t is None else t.numpy(),
                function(x, y, probes))
        return run

    timers = {
        "gradient": timer(gradient),
        "reverse_over_reverse": timer(reverse_over_reverse),
        "forward_over_reverse": timer(forward_over_reverse),
    }
    seconds = alternate(timers, settings["hvp_repeats"])
    # Each compiled function's peak device bytes above what was already
    # held (the model, the batch, earlier parts' tensors), from one more
    # call.
    peaks = {}
    for name, run in timers.items():
        tf.config.experimental.reset_memory_stats("CPU:0")
        held = tf.config.experimental.get_memory_info("CPU:0")["current"]
        run()
        peaks[name] = (
            tf.config.experimental.get_memory_info("CPU:0")["peak"] - held)
    return seconds, peaks, checked


def check_products(reverse, forward, rtol=1e-3):
    """What the two ways made, checked before they are timed: a product
    for every variable from each, and forward over reverse's equal to
    reverse over reverse's within `rtol` of the largest entry (a way that
    returned no tangents would otherwise time a gradient alone). Raises
    RuntimeError naming the variable; returns the count and the largest
    difference over the largest entry."""
    missing = [i for i, products in enumerate(zip(reverse, forward))
               if any(product is None for product in products)]
    if missing:
        raise RuntimeError(f"no Hessian-vector product for variables "
                           f"{missing} of {len(reverse)}")
    reverse = [np.asarray(r) for r in reverse]
    scale = max(np.abs(r).max() for r in reverse)
    differences = [np.abs(np.asarray(f) - r).max() / scale
                   for r, f in zip(reverse, forward)]
    for i, difference in enumerate(differences):
        if not difference <= rtol:
            raise RuntimeError(
                f"forward over reverse's product of variable {i} differs "
                f"from reverse over reverse's by {difference:.2g} of the "
                f"largest entry (allowed: {rtol})")
    return {"variables": len(reverse),
            "largest_difference": float(max(differences))}
