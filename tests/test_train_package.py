"""train/__init__.py: TensorFlow imported with its start-up lines once,
without its GPU search's lines where there is no NVIDIA driver, and
nothing else hidden."""

import os
import re
import signal
import subprocess
import sys

import pytest

import train

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def run_python(code):
    """`python -c code` from the checkout, with TensorFlow's log level
    unset (conftest sets it for this process; a set level turns the filter
    off)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not train.no_nvidia_driver(),
                    reason="an NVIDIA driver is present: the lines are kept")
def test_no_cuda_probe_lines_but_tensorflow_warnings_still_show():
    # Without the filter, TensorFlow's CUDA build prints "Could not find
    # cuda drivers" at import and "failed call to cuInit" at its first op.
    # The cache read only in part is a warning TensorFlow's C++ code logs
    # after the import: the log level is untouched.
    done = run_python(
        "import os, tempfile\n"
        "import train\n"
        "import tensorflow as tf\n"
        "path = os.path.join(tempfile.mkdtemp(), 'cache')\n"
        "data = tf.data.Dataset.range(10).cache(path).take(2)\n"
        "print(list(data.as_numpy_iterator()))\n")
    assert done.returncode == 0, done.stderr
    assert "cuInit" not in done.stderr
    assert "Could not find cuda drivers" not in done.stderr
    assert "did not fully read the dataset being cached" in done.stderr


def test_the_filter_drops_probe_lines_only_and_outlives_a_crash():
    # A fatal error while TensorFlow loads aborts the process holding the
    # GIL; the lines written before must still reach the terminal.
    done = run_python(
        "import os, train\n"
        "with train.stderr_without(train.CUDA_PROBE):\n"
        "    os.write(2, b'E0 cuda_platform.cc:52] failed call to cuInit: "
        "303\\n')\n"
        "    os.write(2, b'F0 port.cc:1] a real fatal error\\n')\n"
        "    os.abort()\n")
    assert done.returncode == -signal.SIGABRT
    assert "a real fatal error" in done.stderr
    assert "cuInit" not in done.stderr


def test_a_log_level_set_by_the_user_turns_the_filter_off(monkeypatch):
    def filter_used(pattern):
        raise AssertionError("stderr was filtered")

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.setattr(train, "stderr_without", filter_used)
    train.import_tensorflow()


def test_the_filter_shows_a_start_up_line_once_and_other_repeats_always():
    # Two copies of a logged line differ in absl's time and thread; a
    # line of a traceback may repeat and must stay.
    done = run_python(
        "import os, train\n"
        "with train.stderr_without(train.NOTHING, train.START_UP):\n"
        "    os.write(2, b'I0000 00:00:17.1   41 fake.cc:1] twice\\n')\n"
        "    os.write(2, b'    ^^^^\\n')\n"
        "    os.write(2, b'I0000 00:00:19.7   41 fake.cc:1] twice\\n')\n"
        "    os.write(2, b'    ^^^^\\n')\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("fake.cc:1] twice") == 1
    assert done.stderr.count("    ^^^^") == 2


def test_import_train_shows_tensorflows_start_up_lines_once():
    def start_up(stderr):
        return [re.sub(r"^[IWEF]\d{4} [\d:.]+ +\d+ ", "", line)
                for line in stderr.splitlines()
                if re.search(train.START_UP, line)
                and not (train.no_nvidia_driver()
                         and re.search(train.CUDA_PROBE, line))]

    plain = start_up(run_python("import tensorflow").stderr)
    shown = start_up(run_python("import train").stderr)
    # TensorFlow 2.21 alone prints its oneDNN and CPU-feature lines twice.
    assert len(shown) == len(set(shown)) == len(set(plain))
    assert set(shown) == set(plain)
