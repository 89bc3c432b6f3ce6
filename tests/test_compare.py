"""The optimizer comparison: the crossing arithmetic, and --quick end to
end (every field, finite losses, both plots, reuse after a rerun)."""

import json
import math

import matplotlib.image
import pytest

from train import compare

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_first_reach_interpolates_between_evaluations():
    curve = [(10, 6.0), (20, 5.0), (30, 4.0)]
    # 4.5 lies between 5.0 (step 20) and 4.0 (step 30), halfway:
    # 20 + 10 * (5.0 - 4.5) / (5.0 - 4.0) = 25.
    assert compare.first_reach(curve, 4.5) == pytest.approx(25.0)
    # 5.75 between 6.0 and 5.0: 10 + 10 * 0.25 / 1.0 = 12.5.
    assert compare.first_reach(curve, 5.75) == pytest.approx(12.5)
    # Exactly on an evaluation: that step.
    assert compare.first_reach(curve, 5.0) == pytest.approx(20.0)
    # Already below at the first evaluation: its step, nothing earlier.
    assert compare.first_reach(curve, 7.0) == 10
    # Below the last point: not reached, not extrapolated to step 35.
    assert compare.first_reach(curve, 3.5) is None
    # A diverged run never reaches.
    assert compare.first_reach([(10, 6.0), (20, math.nan)], 5.0) is None


@pytest.mark.large  # ~85 s: five short pretraining runs, then a rerun
def test_quick_comparison_end_to_end(tmp_path, tmp_path_factory, capsys):
    cache = str(tmp_path_factory.mktemp("cache"))
    argv = ["--quick", "--out", str(tmp_path), "--cache-dir", cache]
    report = compare.main(argv)
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert {"steps_ratio_sophia_vs_adamw", "best", "runs", "settings",
            "machine"} <= set(saved)
    assert set(saved["best"]) == {"sophia-g", "sophia-h", "adamw", "lion"}
    # One lr each, and Sophia-G's second rho at that lr: 5 runs.
    assert len(saved["runs"]) == 5
    assert all(math.isfinite(run["final_val_loss"]) for run in saved["runs"])
    for name, best in saved["best"].items():
        steps = [step for step, _, _ in best["curve"]]
        times = [time for _, time, _ in best["curve"]]
        assert steps == [4, 8], name
        assert 0 < times[0] <= times[1], name
        assert best["curve"][-1][2] == best["final_val_loss"]
    table = (tmp_path / "compare.md").read_text()
    ratios = saved["steps_ratio_sophia_vs_adamw"]
    assert set(ratios) == {"sophia-g", "sophia-h"}
    for name, ratio in ratios.items():
        if ratio is None:
            row = next(x for x in table.splitlines() if f"| {name} |" in x)
            assert "not reached" in row
        else:
            assert math.isfinite(ratio) and ratio > 0
    for name in ("val_loss_vs_steps.png", "val_loss_vs_time.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
        # Decodes as a 700 x 450 RGBA image (7 x 4.5 inches at 100 dpi).
        assert matplotlib.image.imread(tmp_path / name).shape == (
            450, 700, 4), name
    # Fair: the runs differ only in their optimizer settings.
    configs = [json.loads(p.read_text())
               for p in tmp_path.glob("runs/*/config.json")]
    own = {"optimizer", "lr", "min_lr", "rho", "weight_decay", "out"}
    assert len(configs) == 5
    assert all({k: v for k, v in c.items() if k not in own}
               == {k: v for k, v in configs[0].items() if k not in own}
               for c in configs)
    assert all(c["min_lr"] == pytest.approx(c["lr"] / 20) for c in configs)

    # The same command again trains nothing: every run is reused.
    capsys.readouterr()
    again = compare.main(argv)
    assert capsys.readouterr().out.count("finished before: reused") == 5
    assert again["best"] == report["best"]
