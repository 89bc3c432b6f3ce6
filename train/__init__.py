"""The GPT-2 training programs: data, pretraining, benchmark, comparison.

`train.pretrain` runs on Keras's TensorFlow, JAX and torch backends (its
data pipeline is tf.data), `train.benchmark` on each of them without
TensorFlow too. The others are TensorFlow programs throughout
(tf.distribute, the comparison's runs), so each `main` first calls
`require_tensorflow`.

Every `python -m train.X` imports this package first, so TensorFlow is
first imported here, by `import_tensorflow`: its start-up lines once
and, on a machine without an NVIDIA driver, without the lines of its
search for a GPU; on Keras's torch backend after torch and triton
(`import_torch_first`).
"""

import contextlib
import ctypes
import importlib.util
import json
import os
import subprocess
import sys

# What TensorFlow's CUDA build prints while it looks for a GPU: at import,
# the CUDA runtime not found (INFO) and cuDNN/cuFFT/cuBLAS factories
# registered twice (ERROR); at the first device listing, cuInit failing
# (ERROR). With no driver on the machine none of it can be acted on.
CUDA_PROBE = (r"Could not find cuda drivers on your machine"
              r"|Unable to register cu[A-Za-z]+ factory"
              r"|failed call to cuInit")

# A pattern no line matches.
NOTHING = r"(?!)"

# What TensorFlow 2.21's wheel prints twice at import (two of its
# libraries each set up logging): absl's notice, the oneDNN and
# CPU-feature lines. Shown once.
START_UP = (r"^WARNING: All log messages before absl::InitializeLog"
            r"|^To enable the following instructions"
            r"|^[IWEF]\d{4} ")

# The child that filters file descriptor 2 (`stderr_without`).
_FILTER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "stderr_filter.py")


def no_nvidia_driver():
    """Whether this machine has no NVIDIA driver (no /dev/nvidiactl, no
    libcuda), so no GPU can be found whatever TensorFlow tries."""
    if os.path.exists("/dev/nvidiactl"):
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return True
    return False


@contextlib.contextmanager
def stderr_without(drop, once=NOTHING):
    """Runs the block with file descriptor 2 (where TensorFlow's C++ code
    writes, below Python's `sys.stderr`) passed through a child process
    that leaves out the lines matching the regular expression `drop`, and
    repeats of lines matching `once`.

    A child process, not a thread: while TensorFlow's libraries load, this
    process holds the GIL, and if a fatal error ends it there, the child
    still forwards what was written before."""
    sys.stderr.flush()
    try:
        stderr = os.dup(2)
    except OSError:  # no stderr at all (a closed descriptor 2)
        yield
        return
    child = subprocess.Popen(
        [sys.executable, "-I", _FILTER, drop, once],
        stdin=subprocess.PIPE, stdout=stderr, stderr=stderr)
    os.dup2(child.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(stderr, 2)
        os.close(stderr)
        child.stdin.close()  # its last writer: the child drains and exits
        child.wait()


def import_tensorflow():
    """Imports TensorFlow and lists its devices (the GPU search happens on
    the first listing) with its `START_UP` lines once and, where there is
    no NVIDIA driver, without the `CUDA_PROBE` lines. Only those:
    TensorFlow's other messages at every level, Python's warnings and
    tracebacks and a crash's last output still show. With a GPU driver the
    probe's lines are kept (there, cuInit failing is news). If
    TF_CPP_MIN_LOG_LEVEL is set, the user has chosen what TensorFlow
    shows, and it is left alone. Without TensorFlow installed (Keras on
    JAX or torch alone: `train.benchmark` runs there) nothing is
    imported."""
    if ("TF_CPP_MIN_LOG_LEVEL" in os.environ
            or importlib.util.find_spec("tensorflow") is None):
        return
    with stderr_without(CUDA_PROBE if no_nvidia_driver() else NOTHING,
                        START_UP):
        import tensorflow as tf

        tf.config.list_physical_devices()


def keras_backend():
    """The backend Keras will load, found as Keras finds it
    (`KERAS_BACKEND`, else `keras.json` in `KERAS_HOME` or `~/.keras`,
    else TensorFlow), without importing Keras, which would import it."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME",
                          os.path.join(os.path.expanduser("~"), ".keras"))
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def import_torch_first():
    """On Keras's torch backend, imports torch, and triton where torch's
    build brings it (CUDA wheels do), before TensorFlow: triton's C
    extension crashes the process (SIGSEGV; triton 3.8.0 after
    TensorFlow 2.21) when it is loaded after TensorFlow's libraries, even
    with torch loaded first. Loaded first, both work in one process
    (tests_torch/test_import_order.py)."""
    if keras_backend() != "torch":
        return
    import torch  # noqa: F401

    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


import_torch_first()
import_tensorflow()

import keras  # noqa: E402


def require_tensorflow(program):
    """Exits with one line and status 2 unless Keras runs on TensorFlow,
    before anything fails deeper in `program`."""
    if keras.backend.backend() != "tensorflow":
        print(f"{program} runs on Keras's TensorFlow backend only; "
              f"KERAS_BACKEND is {keras.backend.backend()!r}. Unset it or "
              "set it to 'tensorflow' (train.pretrain, train.benchmark and "
              "keras_sophia itself run on JAX: docs/jax.md).",
              file=sys.stderr)
        raise SystemExit(2)
