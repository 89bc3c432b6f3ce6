"""The training program runs end to end on the embedded corpus."""

import json

import numpy as np

from train import pretrain


def test_pretrain_writes_its_files_and_reports_a_finite_loss(tmp_path):
    val_loss = pretrain.main([
        "--steps", "4", "--warmup", "1", "--batch-size", "2",
        "--block-size", "16", "--hessian-interval", "2",
        "--out", str(tmp_path),
    ])
    assert np.isfinite(val_loss)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["optimizer"] == "sophia-g" and config["steps"] == 4
    assert (tmp_path / "final.weights.h5").stat().st_size > 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["val_loss"] == val_loss


def test_windows_are_next_token_pairs():
    rows = pretrain.windows(list(range(23)), block=4)
    # 23 tokens make four 5-token windows; the last 3 tokens are dropped.
    assert rows.shape == (4, 5)
    x, y = rows[:, :-1], rows[:, 1:]
    np.testing.assert_array_equal(y, x + 1)
