"""Setup of the JAX-backend tests: Keras on JAX, two host devices.

They run in their own pytest process (`python -m pytest tests_jax`), as
the backend is chosen once per process and `tests/` runs TensorFlow.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
# Two CPU devices for the data-parallel tests; set before JAX starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")

import sys  # noqa: E402

import keras  # noqa: E402
import pytest  # noqa: E402

# The backend-neutral helpers of tests/ (tests/common.py), imported by the
# test files from here as there.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir,
                                "tests"))
from common import AUSTEN  # noqa: E402,F401
from common import CE  # noqa: E402,F401
from common import check_backend_steps  # noqa: E402,F401
from common import byte_windows  # noqa: E402,F401
from common import classification_data  # noqa: E402,F401
from common import slot_values  # noqa: E402,F401
from common import tiny_classifier  # noqa: E402,F401
from common import without_tensorflow  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    keras.distribution.set_distribution(None)
    yield
