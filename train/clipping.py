"""Global-norm gradient clipping that also counts how often it triggers.

The paper's stability figure compares how often clipping at 1.0 fires
(rarely for Sophia, on more than 10% of steps for AdamW and Lion). Keras
computes the global norm inside the optimizer and throws it away, so this
replaces the optimizer's clipping with the same arithmetic plus two
variables: the last norm and a running count of clipped steps.
"""

import keras
from keras import ops

from keras_sophia import keras_internals


def track_global_clipping(optimizer, clipnorm):
    """Clips `optimizer`'s gradients to global norm `clipnorm` and adds
    `optimizer.grad_norm` and `optimizer.clip_count`. Call inside the
    strategy scope, instead of passing `global_clipnorm`."""
    optimizer.grad_norm = keras.Variable(
        0.0, trainable=False, name="grad_norm",
        aggregation="only_first_replica",
    )
    # "int" like Keras's `iterations`: int64 on TensorFlow, int32 on JAX,
    # which without x64 would truncate an int64 request, with a warning.
    optimizer.clip_count = keras.Variable(
        0, dtype="int", trainable=False, name="clip_count",
        aggregation="only_first_replica",
    )

    def clip(grads):
        squares = [ops.sum(ops.square(g)) for g in grads if g is not None]
        norm = ops.sqrt(ops.sum(ops.stack(squares)))
        clipped = norm > clipnorm
        optimizer.grad_norm.assign(norm)
        optimizer.clip_count.assign_add(
            ops.cast(clipped, optimizer.clip_count.dtype))
        # Same rule as Keras's clip_by_global_norm: scale by c / max(n, c).
        scale = clipnorm / ops.maximum(norm, clipnorm)
        return [None if g is None else g * ops.cast(scale, g.dtype)
                for g in grads]

    return keras_internals.replace_gradient_clipping(optimizer, clip)
