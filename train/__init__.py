"""The GPT-2 training programs: data, pretraining, benchmark, comparison.

They are TensorFlow programs throughout (tf.data, tf.distribute, the
TFDS builder), so under another Keras backend `python -m train.<program>`
stops here with one line and exit status 2, before anything fails deeper
in. The optimizer and `SophiaTrainStep` run on JAX (docs/jax.md).
"""

import sys

import keras

if keras.backend.backend() != "tensorflow":
    print(f"The train programs run on Keras's TensorFlow backend only; "
          f"KERAS_BACKEND is {keras.backend.backend()!r}. Unset it or set "
          "it to 'tensorflow' (keras_sophia itself runs on JAX: "
          "docs/jax.md).", file=sys.stderr)
    raise SystemExit(2)
