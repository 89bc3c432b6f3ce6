"""Setup of the torch-backend tests: Keras on torch.

They run in their own pytest process (`python -m pytest tests_torch`),
as the backend is chosen once per process and `tests/` runs TensorFlow.
`.ci/run` installs what they need: the CPU torch wheel and the authors'
optimizer (`pip install sophia-opt --no-deps`).
"""

import os

os.environ["KERAS_BACKEND"] = "torch"

import sys  # noqa: E402

import keras  # noqa: E402
import pytest  # noqa: E402

# The backend-neutral helpers of tests/ (tests/common.py).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir,
                                "tests"))
from common import CE  # noqa: E402,F401
from common import check_backend_steps  # noqa: E402,F401
from common import classification_data  # noqa: E402,F401
from common import slot_values  # noqa: E402,F401
from common import tiny_classifier  # noqa: E402,F401
from common import without_tensorflow  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
