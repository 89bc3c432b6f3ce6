"""The programs of `train/` on torch in a process that also loads triton,
which CUDA builds of torch bring (`.ci/run` installs it beside the CPU
build for this test)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.parametrize("fixed", [True, False])
def test_triton_loads_beside_tensorflow_when_train_is_imported_first(fixed):
    pytest.importorskip("triton", reason="CI installs triton for this test")
    # TensorFlow first, then triton: the crash `train` avoids (SIGSEGV,
    # triton 3.8 beside TensorFlow 2.21), so that this test shows the
    # order still matters with the versions installed.
    program = ("import train, triton" if fixed
               else "import tensorflow, triton")
    run = subprocess.run([sys.executable, "-c", program], cwd=ROOT,
                         env={**os.environ, "KERAS_BACKEND": "torch"},
                         capture_output=True, text=True, timeout=300,
                         check=False)
    if fixed:
        assert run.returncode == 0, run.stderr[-2000:]
    else:
        assert run.returncode != 0
