"""The GPT-2 training programs: data, pretraining, benchmark, comparison.

`train.pretrain` runs on Keras's TensorFlow and JAX backends. The others
are TensorFlow programs throughout (tf.distribute, TensorFlow's memory
counters, the comparison's runs), so each `main` first calls
`require_tensorflow`.
"""

import sys

import keras


def require_tensorflow(program):
    """Exits with one line and status 2 unless Keras runs on TensorFlow,
    before anything fails deeper in `program`."""
    if keras.backend.backend() != "tensorflow":
        print(f"{program} runs on Keras's TensorFlow backend only; "
              f"KERAS_BACKEND is {keras.backend.backend()!r}. Unset it or "
              "set it to 'tensorflow' (train.pretrain and keras_sophia "
              "itself run on JAX: docs/jax.md).", file=sys.stderr)
        raise SystemExit(2)
