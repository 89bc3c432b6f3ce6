"""NaN and Inf never reach m, h or the weights: a step with a non-finite
gradient is skipped and counted; a non-finite estimate leaves h alone."""

import numpy as np
import pytest
from conftest import CE
from conftest import CPUS
from conftest import classification_data
from conftest import state
from conftest import tiny_classifier
from conftest import train

from keras_sophia import Sophia


def fit(x, y, interval, estimator, devices=None):
    """Sophia on `x, y` in batches of 8, from fixed initial weights."""
    return train(
        lambda: Sophia(0.05, hessian_update_interval=interval,
                       estimator=estimator, seed=1),
        devices, x=x, y=y, batch_size=8,
    )


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
@pytest.mark.parametrize("interval", [2, 1])
@pytest.mark.parametrize("devices", [None, tuple(CPUS[:2])])
def test_nan_gradient_step_is_skipped_and_counted(estimator, interval,
                                                  devices):
    # Batches b0, bad, b2 where `bad` holds one NaN row (on two replicas:
    # in replica 1's half only). The bad step must change nothing: not the
    # weights, m, h or iterations, so the run equals b0, b2. With interval
    # 1 the bad step is also a refresh, whose estimate must not reach h.
    x, y = classification_data(n=24)
    x[15] = np.nan
    with_bad = fit(x, y, interval, estimator, devices)
    keep = np.r_[0:8, 16:24]
    without = fit(x[keep], y[keep], interval, estimator, devices)
    sophia = with_bad.optimizer
    assert sophia.iterations.numpy() == 2
    assert sophia.skipped_steps.numpy() == 1
    assert sophia.skipped_refreshes.numpy() == (1 if interval == 1 else 0)
    for bad, good in zip(state(with_bad, "skipped"), state(without, "skipped")):
        for value in bad:
            assert np.all(np.isfinite(value))
            np.testing.assert_array_equal(value, good[0])


def test_nan_estimate_leaves_h_alone_and_training_goes_on():
    # An estimator that always fails: h stays 0 (Sophia degrades to
    # sign-momentum steps), each refresh is counted, the weights move.
    x, y = classification_data(n=32)
    model = tiny_classifier()
    start = [w.copy() for w in model.get_weights()]
    model.compile(Sophia(0.05, hessian_update_interval=2, seed=1,
                         estimator=lambda ctx: [v * np.nan
                                                for v in ctx.variables]), CE)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    sophia = model.optimizer
    assert sophia.skipped_refreshes.numpy() == 2  # steps 0 and 2
    assert sophia.skipped_steps.numpy() == 0
    for v in sophia.variables:
        assert np.all(np.isfinite(v.numpy())), v.name
        if "hessian" in v.name:
            assert np.all(v.numpy() == 0), v.name
    assert all(np.any(w != s) for w, s in zip(model.get_weights(), start))
