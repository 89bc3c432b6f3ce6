"""One `train.pretrain` run whose peak memory `train.benchmark` reads:

    python -m train.peak_memory_child OUT [train.pretrain flags]

Writes to OUT, as JSON, `device`: the peak bytes TensorFlow's CPU
allocator held over the training steps (every tensor and XLA buffer of a
step; what a GPU's or TPU's peak bytes are), and `process`: the
process's peak RSS (also the runtime, the data and compiling: XLA's
compiler alone takes about half a GB here). The process reads its own
VmHWM: the kernel's `ru_maxrss` of a child also counts the parent's
memory at fork.
"""

import json
import runpy
import sys

import keras
import tensorflow as tf


class DevicePeak(keras.callbacks.Callback):
    """Keeps the allocator's peak after each batch in `seen["device"]`."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def on_train_batch_end(self, batch, logs=None):
        self.seen["device"] = tf.config.experimental.get_memory_info(
            "CPU:0")["peak"]


def main(out, flags):
    seen = {}
    fit = keras.Model.fit

    # train.pretrain calls fit itself; each call gets the callback too.
    def fit_watched(model, *args, callbacks=(), **kwargs):
        return fit(model, *args, callbacks=[DevicePeak(seen), *callbacks],
                   **kwargs)

    keras.Model.fit = fit_watched
    sys.argv = ["train.pretrain", *flags]
    runpy.run_module("train.pretrain", run_name="__main__")
    with open("/proc/self/status") as f:
        seen["process"] = [int(line.split()[1]) * 1024 for line in f
                           if line.startswith("VmHWM:")][0]
    with open(out, "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
