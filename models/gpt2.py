"""GPT-2 sizes on keras-hub's `GPT2Backbone`, trained with Sophia.

Built from a config (no preset download). `GPT2CausalLM` ties its output
projection to the token embedding. Dropout is 0.0 as in the Sophia paper's
runs (keras-hub defaults to 0.1).
"""

import keras
import keras_hub

import keras_sophia

# GPT-2's BPE vocabulary; byte-level models pass 256.
VOCAB_SIZE = 50257

# (layers, heads, width); the MLP is 4x the width, blocks are 1024 tokens.
SIZES = {
    # Byte-level sizes (with `--tokenizer bytes`): small enough for runs of
    # thousands of steps on a CPU, and 5.6x apart in parameters so that a
    # comparison at both shows whether its answer moves with scale.
    "byte-s": (4, 4, 64),  # 0.22M parameters with 256 tokens
    "byte-m": (6, 4, 128),  # 1.23M
    "tiny": (2, 2, 128),  # CPU-sized default for examples and tests
    "30m": (6, 6, 384),  # the paper's hyperparameter-sweep size
    "125m": (12, 12, 768),  # GPT-2 small
    "355m": (24, 16, 1024),  # GPT-2 medium
    "770m": (36, 20, 1280),  # GPT-2 large
}


@keras.saving.register_keras_serializable(package="keras_sophia_models")
class SophiaGPT2(keras_sophia.SophiaTrainStep, keras_hub.models.GPT2CausalLM):
    """keras-hub's GPT-2 causal LM with the Hessian-refreshing train step
    (which also makes a `.keras` file reload with its Sophia compile)."""


def build(name="tiny", block_size=1024, dropout=0.0,
          vocabulary_size=VOCAB_SIZE):
    """A `SophiaGPT2` of the named size, with no preprocessor attached.

    Inputs are `{"token_ids", "padding_mask"}` of shape (batch, block);
    outputs are logits (batch, block, vocabulary_size).
    """
    if name not in SIZES:
        raise ValueError(
            f"Argument `name` must be one of {sorted(SIZES)}. "
            f"Received: name={name!r}"
        )
    layers, heads, width = SIZES[name]
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=width,
        intermediate_dim=4 * width,
        dropout=dropout,
        max_sequence_length=block_size,
    )
    return SophiaGPT2(backbone=backbone, preprocessor=None)
