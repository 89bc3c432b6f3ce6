"""The optimizer comparison: the protocol's decisions (sweeps, edges,
seeds, budgets), the speedup and crossing arithmetic, and --quick end to
end (every field, finite losses, the plots, reuse after a rerun)."""

import concurrent.futures
import json
import math

import matplotlib.image
import pytest

from train import compare
from train import compare_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_first_reach_interpolates_between_evaluations():
    curve = [(10, 6.0), (20, 5.0), (30, 4.0)]
    # 4.5 lies between 5.0 (step 20) and 4.0 (step 30), halfway:
    # 20 + 10 * (5.0 - 4.5) / (5.0 - 4.0) = 25.
    assert compare_report.first_reach(curve, 4.5) == pytest.approx(25.0)
    # 5.75 between 6.0 and 5.0: 10 + 10 * 0.25 / 1.0 = 12.5.
    assert compare_report.first_reach(curve, 5.75) == pytest.approx(12.5)
    # Exactly on an evaluation: that step.
    assert compare_report.first_reach(curve, 5.0) == pytest.approx(20.0)
    # Already below at the first evaluation: its step, nothing earlier.
    assert compare_report.first_reach(curve, 7.0) == 10
    # Below the last point: not reached, not extrapolated to step 35.
    assert compare_report.first_reach(curve, 3.5) is None
    # A diverged run (NaN, stored as None) never reaches.
    assert compare_report.first_reach([(10, 6.0), (20, None)], 5.0) is None


BUDGETS = [(0.5, 2.0), (0.75, 1.8), (1.0, 1.7), (1.5, 1.6), (2.0, 1.5)]


def test_speedup_interpolates_in_log_budget():
    # On a budget: that budget.
    assert compare_report.speedup(1.7, BUDGETS) == pytest.approx(1.0)
    assert compare_report.speedup(1.5, BUDGETS) == pytest.approx(2.0)
    # Halfway in loss between 1x (1.7) and 1.5x (1.6): halfway in
    # log(budget), exp((log 1 + log 1.5) / 2) = sqrt(1.5).
    assert compare_report.speedup(1.65, BUDGETS) == pytest.approx(
        math.sqrt(1.5))
    # Worse than AdamW's own budget: below 1, here sqrt(0.5 * 0.75).
    assert compare_report.speedup(1.9, BUDGETS) == pytest.approx(
        math.sqrt(0.375))
    # Outside the budgets measured: said, never extrapolated.
    assert compare_report.speedup(2.1, BUDGETS) == "not reached"
    assert compare_report.speedup(None, BUDGETS) == "not reached"
    assert compare_report.speedup(1.4, BUDGETS) == "above 2x"


def test_speedup_takes_the_first_crossing_of_a_noisy_curve():
    # 1.5x came out worse than 1x (noise): the first budget at or below
    # the target decides. 1.65 lies between 0.75x (1.8) and 1x (1.6):
    # t = 0.15 / 0.2 = 0.75 of the way in log(budget).
    noisy = [(0.5, 2.0), (0.75, 1.8), (1.0, 1.6), (1.5, 1.7), (2.0, 1.5)]
    expected = math.exp(math.log(0.75) + 0.75 * (math.log(1.0)
                                                 - math.log(0.75)))
    assert compare_report.speedup(1.65, noisy) == pytest.approx(expected)


def _drive(generator, loss):
    """Runs a protocol generator with `loss(setting)` as each run's final
    loss; returns (every setting asked for, in order; the result)."""
    asked, response = [], None
    while True:
        try:
            request = generator.send(response)
        except StopIteration as stop:
            return asked, stop.value
        asked += request
        response = [dict(vars(s), setting=s, final_val_loss=loss(s))
                    for s in request]


def _bowl(best_lr, best_rho=None):
    # A loss whose minimum over the grid is the lr (and rho) nearest the
    # given ones, in log space.
    def loss(setting):
        value = abs(math.log2(setting.lr / best_lr))
        if best_rho is not None:
            value += abs(math.log2(setting.rho / best_rho))
        return value
    return loss


@pytest.mark.parametrize("best_lr, extra", [
    # Interior optimum: the grid alone.
    (6e-3, []),
    # One step past the top: 4.8e-2 wins, 9.6e-2 loses, and it stops.
    (4.8e-2, [4.8e-2, 9.6e-2]),
    # Far past the top: MAX_EXTENSIONS (3) extra runs and no more.
    (10.0, [4.8e-2, 9.6e-2, 0.192]),
    # Below the bottom: downwards, halving.
    (7e-4, [7.5e-4, 3.75e-4]),
])
def test_lr_sweep_extends_past_an_edge(best_lr, extra):
    asked, result = _drive(
        compare.tune("adamw", compare.LRS["adamw"], compare.RHOS, 1, 3, 100),
        _bowl(best_lr))
    tuning = [s.lr for s in asked if s.steps is None]
    assert tuning == list(compare.LRS["adamw"]) + extra
    # The winner is the tried lr nearest best_lr.
    assert result["best"]["lr"] == min(
        tuning, key=lambda lr: abs(math.log2(lr / best_lr)))


def test_adamw_gets_seeds_and_budgets_of_its_best_setting():
    asked, result = _drive(
        compare.tune("adamw", compare.LRS["adamw"], compare.RHOS, 3, 3,
                     2000), _bowl(6e-3))
    again = [s for s in asked if s.seed]
    assert [(s.lr, s.seed) for s in again] == [(6e-3, 1), (6e-3, 2)]
    budgets = [s for s in asked if s.steps]
    # 0.5x, 0.75x, 1.5x and 2x of 2,000 steps, all at the best lr, seed 0.
    assert [s.steps for s in budgets] == [1000, 1500, 3000, 4000]
    assert {(s.lr, s.seed) for s in budgets} == {(6e-3, 0)}
    assert len(result["seeds"]) == 3 and len(result["budgets"]) == 4


def test_sophia_sweeps_lr_then_rho_then_lr_again():
    # Best at lr 2.5e-4, rho 0.2: the lr sweep at rho 0.05 finds 2.5e-4;
    # the rho sweep there finds 0.2 (an edge: 0.8 is tried and loses);
    # then lr's neighbours at rho 0.2 (1.25e-4 and 5e-4) both lose.
    asked, result = _drive(
        compare.tune("sophia-g", compare.LRS["sophia-g"], compare.RHOS, 2,
                     3, 100), _bowl(2.5e-4, 0.2))
    tuning = [(s.lr, s.rho) for s in asked if not s.seed]
    assert tuning == (
        [(lr, 0.05) for lr in compare.LRS["sophia-g"]]
        + [(2.5e-4, 0.0125), (2.5e-4, 0.2), (2.5e-4, 0.8)]
        + [(1.25e-4, 0.2), (5e-4, 0.2)])
    assert (result["best"]["lr"], result["best"]["rho"]) == (2.5e-4, 0.2)
    # Seeds of the winner; no budgets for Sophia.
    assert [(s.lr, s.rho, s.seed) for s in asked if s.seed] == [
        (2.5e-4, 0.2, 1)]
    assert result["budgets"] == []


def test_sophia_keeps_its_lr_when_the_first_rho_wins():
    asked, result = _drive(
        compare.tune("sophia-h", compare.LRS["sophia-h"], compare.RHOS, 1,
                     3, 100), _bowl(5e-4, 0.05))
    assert len(asked) == 5 + 2  # the lr grid, then two other rhos
    assert (result["best"]["lr"], result["best"]["rho"]) == (5e-4, 0.05)


class _Finished:
    """A stand-in for `compare.Runner`: each run finishes at once."""

    def __init__(self, loss):
        self.loss, self.trained = loss, []

    def submit(self, setting):
        self.trained.append(setting)
        future = concurrent.futures.Future()
        future.set_result(dict(vars(setting), setting=setting,
                               final_val_loss=self.loss(setting)))
        return future


def test_a_follower_runs_at_its_leaders_best_setting():
    # Sophia-G's sweep finds lr 5e-4, rho 0.05; Sophia-G on half the
    # batch then trains that setting and its seeds, nothing else.
    runner = _Finished(_bowl(5e-4, 0.05))

    def then(name, result):
        best = result["best"]
        return {"sophia-g-half": compare.tune(
            "sophia-g-half", (best["lr"],), (best["rho"],), 2, 0, 100,
            rho=best["rho"])} if name == "sophia-g" else {}

    results = compare.drive({"sophia-g": compare.tune(
        "sophia-g", compare.LRS["sophia-g"], compare.RHOS, 2, 3, 100)},
        runner, then)
    half = [(s.lr, s.rho, s.seed) for s in runner.trained
            if s.contender == "sophia-g-half"]
    assert half == [(5e-4, 0.05, 0), (5e-4, 0.05, 1)]
    assert results["sophia-g-half"]["best"]["lr"] == 5e-4
    assert len(results["sophia-g-half"]["seeds"]) == 2


def test_transfer_tunes_around_the_smaller_models_best(tmp_path):
    # The finished comparison found AdamW at 1.2e-2, Sophia-G at 2.5e-4
    # (rho 0.05), Sophia-H at 1e-3 (rho 3.2). At the larger size the best
    # lrs are 6e-3 (an edge: 3e-3 is tried and loses), 2.5e-4 and 2e-3
    # (an edge: 4e-3 loses); rho stays; no Lion, no half batch.
    best = {"adamw": {"lr": 1.2e-2, "rho": None},
            "sophia-g": {"lr": 2.5e-4, "rho": 0.05},
            "sophia-h": {"lr": 1e-3, "rho": 3.2},
            "sophia-g-half": {"lr": 2.5e-4, "rho": 0.05},
            "lion": {"lr": 2e-3, "rho": None}}
    (tmp_path / "compare.json").write_text(json.dumps(
        {"best": best, "settings": {"model": "byte-s"}}))
    args = compare.parse_args(["--transfer", str(tmp_path), "--seeds", "2",
                               "--model", "byte-m"])
    protocols, then, grids = compare.plan(args)
    assert grids["contenders"] == ["sophia-g", "sophia-h", "adamw"]
    assert grids["planned"] == 9
    targets = {"adamw": 6e-3, "sophia-g": 2.5e-4, "sophia-h": 2e-3}
    runner = _Finished(lambda s: abs(math.log2(s.lr / targets[s.contender])))
    results = compare.drive(protocols, runner, then)
    tuning = {}
    for s in runner.trained:
        if not s.seed and not s.steps:
            tuning.setdefault(s.contender, []).append((s.lr, s.rho))
    assert tuning == {
        "adamw": [(6e-3, None), (1.2e-2, None), (2.4e-2, None),
                  (3e-3, None)],
        "sophia-g": [(1.25e-4, 0.05), (2.5e-4, 0.05), (5e-4, 0.05)],
        "sophia-h": [(5e-4, 3.2), (1e-3, 3.2), (2e-3, 3.2), (4e-3, 3.2)]}
    assert {name: (r["best"]["lr"], len(r["seeds"]))
            for name, r in results.items()} == {
        "adamw": (6e-3, 2), "sophia-g": (2.5e-4, 2), "sophia-h": (2e-3, 2)}
    assert [r["steps"] for r in results["adamw"]["budgets"]] == [
        1000, 1500, 3000, 4000]


def test_bad_arguments_exit_with_status_2(capsys, tmp_path):
    for argv in (["--steps", "30"], ["--seeds", "0"], ["--jobs", "-1"],
                 ["--transfer", str(tmp_path)],
                 ["--transfer", str(tmp_path), "--quick"]):
        with pytest.raises(SystemExit) as exit_:
            compare.parse_args(argv)
        assert exit_.value.code == 2
        assert "--" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.large  # ~8 min: 20 short runs in subprocesses, then a rerun
def test_quick_comparison_end_to_end(tmp_path, tmp_path_factory, capsys):
    cache = str(tmp_path_factory.mktemp("cache"))
    argv = ["--quick", "--out", str(tmp_path), "--cache-dir", cache,
            "--seeds", "2"]
    report = compare.main(argv)
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert {"speedup_vs_adamw", "steps_ratio_vs_adamw", "adamw_budgets",
            "best", "grid", "settings", "machine"} <= set(saved)
    sophias = {"sophia-g", "sophia-h", "sophia-g-half"}
    assert set(saved["best"]) == sophias | {"adamw", "lion"}
    assert set(saved["speedup_vs_adamw"]) == sophias
    for value in saved["speedup_vs_adamw"].values():
        assert value in ("not reached", "above 2x") or 0.5 <= value <= 2.0
    assert [b["steps"] for b in saved["adamw_budgets"]] == [4, 6, 8, 12, 16]
    assert all(math.isfinite(run["final_val_loss"]) for run in saved["grid"])
    for name, best in saved["best"].items():
        assert len(best["final_val_loss_by_seed"]) == 2, name
        # Another seed is another run (data order, initialisation).
        assert len(set(best["final_val_loss_by_seed"])) == 2, name
        steps = [point[0] for point in best["curve"]]
        assert steps == [2, 4, 6, 8], name
        # Only Sophia has a win rate; AdamW's and Lion's are None.
        if name in sophias:
            assert all(0 <= w <= 1 for w in best["final_win_rate_by_seed"])
        else:
            assert best["final_win_rate_by_seed"] == [None, None], name
    table = (tmp_path / "compare.md").read_text()
    assert "| sophia-g-half |" in table and "| 2x | 16 |" in table
    for name in ("val_loss_vs_steps.png", "val_loss_vs_time.png",
                 "adamw_budgets.png", "sophia_diagnostics.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE, name
        assert matplotlib.image.imread(tmp_path / name).ndim == 3, name
    # Fair: the runs differ only in their optimizer settings, seed and
    # budget (with its warmup).
    configs = [json.loads(p.read_text())
               for p in tmp_path.glob("runs/*/config.json")]
    own = {"optimizer", "lr", "min_lr", "rho", "weight_decay", "out", "seed",
           "steps", "warmup", "hessian_batch_fraction"}
    assert len(configs) == len(saved["grid"])
    assert all({k: v for k, v in c.items() if k not in own}
               == {k: v for k, v in configs[0].items() if k not in own}
               for c in configs)
    # The same command again trains nothing: every run is reused.
    capsys.readouterr()
    again = compare.main(argv)
    assert capsys.readouterr().out.count("finished before: reused") == len(
        configs)
    assert again["best"] == report["best"]
