"""Peak device bytes of `fit` on NumPy arrays, the input path most Keras
users write first: `train.benchmark`'s arrays cell, one optimizer per
process.

`fit(x, y, batch_size=B)` on 2.5 batches of random tokens: the last batch
is a partial one, so TensorFlow traces the step with a batch size it does
not know (None), which is what this cell measures against `train.pretrain`'s
static batches. The steps are a refresh (step 0), an ordinary step and the
partial batch.

    python -m train.fit_memory OUT [train.pretrain flags: --optimizer,
        --hessian-batch-fraction, --model, --batch-size, --block-size,
        --jit]

writes `{"device": peak bytes, "process": peak RSS}` to OUT: the largest
of TensorFlow's `get_memory_info("CPU:0")["peak"]` after each batch, and
the process's VmHWM.
"""

import json
import sys

import keras
import numpy as np
import tensorflow as tf

from models import gpt2
from train import pretrain


class DevicePeak(keras.callbacks.Callback):
    """The largest device peak seen after a batch."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def on_train_batch_end(self, batch, logs=None):
        self.peak = max(self.peak, tf.config.experimental.get_memory_info(
            "CPU:0")["peak"])


def main(argv=None):
    out, *flags = sys.argv[1:] if argv is None else argv
    config = pretrain.parse_config(flags)
    keras.utils.set_random_seed(config.seed)
    model = gpt2.build(config.model, block_size=config.block_size)
    model.compile(pretrain.make_optimizer(config),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=config.jit)
    rows = config.batch_size * 5 // 2
    tokens = np.random.default_rng(0).integers(
        0, gpt2.VOCAB_SIZE, size=(rows, config.block_size + 1))
    x = {"token_ids": tokens[:, :-1],
         "padding_mask": np.ones_like(tokens[:, :-1])}
    peak = DevicePeak()
    model.fit(x, tokens[:, 1:], batch_size=config.batch_size, epochs=1,
              shuffle=False, verbose=0, callbacks=[peak])
    with open("/proc/self/status") as f:
        process = [int(line.split()[1]) * 1024 for line in f
                   if line.startswith("VmHWM:")][0]
    with open(out, "w") as f:
        json.dump({"device": peak.peak, "process": process}, f)


if __name__ == "__main__":
    main()
