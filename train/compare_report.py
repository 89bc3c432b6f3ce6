"""What `train.compare` makes of its runs: the speedup arithmetic,
`compare.json`, `compare.md` and the plots.

* `val_loss_vs_steps.png`, `val_loss_vs_time.png`: each contender's best
  setting, the mean over seeds with a band from the lowest to the highest.
* `adamw_budgets.png`: AdamW's final loss against its step budget, with
  each Sophia variant's final loss (mean and band over seeds) marked: where
  a Sophia line crosses AdamW's curve is its speedup.
* `sophia_diagnostics.png`: win rate (the share of coordinates not
  clipped) and ||h|| over the steps, every Sophia run in grey and each
  variant's best setting in colour: when, if ever, the curvature estimate
  takes over from clipping.
"""

import importlib.metadata
import json
import math
import os
import pathlib
import platform
import statistics
import time

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def read_run(path):
    """A run's curves from its metrics.jsonl: `curve` [[step, time,
    val_loss]], `diagnostics` [[step, win_rate, hessian_norm]] (Sophia
    only), the final validation loss (None if not finite) and the training
    seconds per step after the first evaluation (which includes tracing).
    A step logged twice (work redone after a resume) keeps its last line."""
    lines = list(map(json.loads, pathlib.Path(path).read_text().splitlines()))
    points = {x["step"]: [x["step"], x["time"], _finite(x["val_loss"])]
              for x in lines if "val_loss" in x}
    curve = [points[step] for step in sorted(points)]
    diagnostics = {x["step"]: [x["step"], x["win_rate"], x["hessian_norm"]]
                   for x in lines if "win_rate" in x}
    (step0, time0, _), (step1, time1, _) = curve[0], curve[-1]
    return {
        "final_val_loss": curve[-1][2],
        "seconds_per_step": (time1 - time0) / (step1 - step0)
        if step1 > step0 else None,
        "final_win_rate": diagnostics[max(diagnostics)][1]
        if diagnostics else None,
        "curve": curve,
        "diagnostics": [diagnostics[step] for step in sorted(diagnostics)],
    }


def first_reach(curve, target):
    """The first x at which `loss <= target`, for a curve of (x, loss)
    points; None if it never gets there.

    Validation runs only every `eval_interval` steps, so the crossing is
    interpolated linearly between the two evaluations that bracket it. If
    the first evaluation is already at or below `target`, its x is
    returned (the loss before it was not measured). No extrapolation past
    the last point: a run that has not reached `target` has not."""
    previous = None
    for x, loss in curve:
        if loss is not None and loss <= target:
            if previous is None or previous[1] is None:
                return x
            x0, loss0 = previous
            return x0 + (x - x0) * (loss0 - target) / (loss0 - loss)
        previous = x, loss
    return None


def speedup(target, budgets):
    """The AdamW budget (a multiple of the base one) whose final loss
    equals `target`, interpolated linearly in log(budget) between the two
    budgets that bracket it; `budgets` is [(multiple, final loss)] in
    increasing multiples. "not reached" if `target` is above the smallest
    budget's loss (or None), "above Nx" if below the largest's."""
    multiple, loss = budgets[0]
    if target is None or loss is None or target > loss:
        return "not reached"
    for (b1, loss1), (b2, loss2) in zip(budgets, budgets[1:]):
        # Here loss1 >= target: the crossing lies at or after b1.
        if loss2 is not None and loss2 <= target:
            t = (loss1 - target) / (loss1 - loss2) if loss1 > loss2 else 0.0
            return math.exp(math.log(b1) + t * (math.log(b2) - math.log(b1)))
    return f"above {budgets[-1][0]:g}x"


def _mean(values):
    return None if None in values else statistics.fmean(values)


def _mean_curve(runs):
    """[[step, mean time, mean loss, lowest, highest]] over `runs`."""
    points = []
    for column in zip(*(run["curve"] for run in runs)):
        losses = [point[2] for point in column]
        finite = [x for x in losses if x is not None]
        points.append([column[0][0],
                       statistics.fmean(point[1] for point in column),
                       _mean(losses), min(finite, default=None),
                       max(finite, default=None)])
    return points


def report(results, runs, flags, settings, load_start, seconds):
    """The comparison's results as one JSON-ready dict."""
    steps = settings["steps"]
    adamw = results["adamw"]
    budgets = sorted((run["steps"] / steps, run["final_val_loss"])
                     for run in [adamw["best"]] + adamw["budgets"])
    adamw_target = _mean([run["final_val_loss"] for run in adamw["seeds"]])
    best = {}
    for name, result in results.items():
        seeds = result["seeds"]
        losses = [run["final_val_loss"] for run in seeds]
        mean = _mean(losses)
        curve = _mean_curve(seeds)
        reached = None if adamw_target is None else first_reach(
            [(point[0], point[2]) for point in curve], adamw_target)
        entry = {key: result["best"][key] for key in ("lr", "rho")}
        entry.update(
            flags=flags(result["best"]["setting"]),
            final_val_loss_by_seed=losses,
            final_val_loss_mean=mean,
            final_val_loss_spread=None if mean is None
            else max(losses) - min(losses),
            speedup_vs_adamw=speedup(mean, budgets),
            speedup_by_seed=[speedup(x, budgets) for x in losses],
            steps_ratio_vs_adamw=None if reached is None
            else reached / steps,
            seconds_per_step=_mean([run["seconds_per_step"]
                                    for run in seeds]),
            final_win_rate_by_seed=[run["final_win_rate"] for run in seeds],
            curve=curve,
        )
        best[name] = entry
    sophias = [name for name in best if best[name]["rho"] is not None]
    grid = sorted(
        runs, key=lambda run: (run["contender"], run["steps"], run["seed"],
                         run["rho"] or 0, run["lr"]))
    return {
        "speedup_vs_adamw": {
            name: best[name]["speedup_vs_adamw"] for name in sophias},
        "steps_ratio_vs_adamw": {
            name: best[name]["steps_ratio_vs_adamw"] for name in sophias},
        "adamw_budgets": [{"budget": b, "steps": round(b * steps),
                           "final_val_loss": loss} for b, loss in budgets],
        "best": best,
        "grid": [{k: v for k, v in run.items()
                  if k not in ("setting", "curve", "diagnostics")}
                 for run in grid],
        "settings": settings,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "tensorflow": importlib.metadata.version("tensorflow"),
            "keras": importlib.metadata.version("keras"),
            "keras_hub": importlib.metadata.version("keras-hub"),
            "date": time.strftime("%Y-%m-%d"),
            "load_average_start": list(load_start),
            "load_average_end": list(os.getloadavg()),
            "minutes": seconds / 60,
        },
    }


def write(report, results, runs, out):
    """compare.json, compare.md and the four plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a diverged loss is stored as null, never as NaN.
    (out / "compare.json").write_text(
        json.dumps(report, indent=2, allow_nan=False) + "\n")
    table = markdown(report)
    (out / "compare.md").write_text(table)
    _plot_curves(report, out)
    _plot_budgets(report, out)
    _plot_diagnostics(report, results, runs, out)
    print(table)
    print(f"compare.json, compare.md and the plots are in {out}")


def _number(x, spec=".4f"):
    if x is None:
        return "NaN"
    return x if isinstance(x, str) else format(x, spec)


def markdown(report):
    seeds = report["settings"]["seeds"]
    rows = [
        f"| contender | lr | rho | final val loss, mean over {seeds} "
        "seeds (min-max) | speedup vs AdamW (per seed) | steps ratio | "
        "final win rate | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in report["best"].items():
        losses = [x for x in run["final_val_loss_by_seed"] if x is not None]
        spread = (f" ({min(losses):.4f}-{max(losses):.4f})"
                  if len(losses) > 1 else "")
        per_seed = ", ".join(_number(x, ".2f")
                             for x in run["speedup_by_seed"])
        win = [x for x in run["final_win_rate_by_seed"] if x is not None]
        rows.append(
            f"| {name} | {run['lr']:g} | "
            + ("" if run["rho"] is None else f"{run['rho']:g}")
            + f" | {_number(run['final_val_loss_mean'])}{spread} | "
            + ("" if run["rho"] is None else
               f"{_number(run['speedup_vs_adamw'], '.2f')} ({per_seed})")
            + " | " + ("not reached" if run["steps_ratio_vs_adamw"] is None
                       else f"{run['steps_ratio_vs_adamw']:.2f}") + " | "
            + (f"{statistics.fmean(win):.3f}" if win else "")
            + f" | {_number(run['seconds_per_step'], '.3f')} |")
    rows += ["", "| AdamW budget | steps | final val loss |", "|---|---|---|"]
    rows += [f"| {b['budget']:g}x | {b['steps']} | "
             f"{_number(b['final_val_loss'])} |"
             for b in report["adamw_budgets"]]
    rows += [
        "",
        "speedup: the AdamW step budget (each with its own full schedule) "
        "whose final loss equals the Sophia variant's mean final loss, "
        "interpolated in log(budget), over the base budget; the paper "
        "claims 2.0, below 1.0 Sophia is worse. steps ratio: the step at "
        "which the mean curve first reaches AdamW's mean final loss, over "
        "the budget (secondary: AdamW's schedule has not decayed there). "
        "win rate: share of coordinates not clipped at the last refresh. "
        "s/step: training seconds per step after the first evaluation, "
        f"{report['settings']['jobs']} runs at a time on "
        f"{report['machine']['cpu_count']} cores.",
        "",
        "Every run (tuning, seeds, budgets):",
        "",
        "| contender | lr | rho | seed | steps | final val loss |",
        "|---|---|---|---|---|---|",
    ]
    rows += [f"| {run['contender']} | {run['lr']:g} | "
             + ("" if run["rho"] is None else f"{run['rho']:g}")
             + f" | {run['seed']} | {run['steps']} | "
             f"{_number(run['final_val_loss'])} |"
             for run in report["grid"]]
    return "\n".join(rows) + "\n"


def _figure(*shape, size=(7, 4.5)):
    # matplotlib's object API on an Agg canvas: no pyplot, no global
    # backend to set.
    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(*shape)


def _title(settings):
    return (f"{settings['model']} on {settings['data']}, "
            f"{settings['steps']} steps of {settings['batch_size']} x "
            f"{settings['block_size']} tokens")


def _plot_curves(report, out):
    for column, xlabel, name in (
        (0, "step", "val_loss_vs_steps.png"),
        (1, "training seconds (validation excluded)",
         "val_loss_vs_time.png"),
    ):
        figure, axes = _figure()
        for contender, run in report["best"].items():
            curve = [p for p in run["curve"] if p[2] is not None]
            xs = [p[column] for p in curve]
            rho = "" if run["rho"] is None else f", rho {run['rho']:g}"
            line, = axes.plot(xs, [p[2] for p in curve],
                              label=f"{contender} (lr {run['lr']:g}{rho})")
            axes.fill_between(xs, [p[3] for p in curve],
                              [p[4] for p in curve],
                              color=line.get_color(), alpha=0.25)
        axes.set_xlabel(xlabel)
        axes.set_ylabel("validation loss")
        axes.set_title(_title(report["settings"]) + ": best settings",
                       fontsize=9)
        _zoom(axes, report)
        axes.legend(fontsize=8)
        figure.savefig(out / name, dpi=100)


def _zoom(axes, report):
    # From a little below the best final loss to a little above the worst,
    # so the end of training (what is compared) is readable.
    finals = [run["final_val_loss_mean"] for run in report["best"].values()
              if run["final_val_loss_mean"] is not None]
    if finals:
        low, high = min(finals), max(finals)
        axes.set_ylim(low - 0.1, high + max(0.6, 2 * (high - low)))


def _plot_budgets(report, out):
    figure, axes = _figure()
    budgets = [b for b in report["adamw_budgets"]
               if b["final_val_loss"] is not None]
    axes.plot([b["steps"] for b in budgets],
              [b["final_val_loss"] for b in budgets], "ko-",
              label="AdamW, each budget with its own schedule")
    for index, (name, speedup) in enumerate(
            report["speedup_vs_adamw"].items()):
        run = report["best"][name]
        losses = [x for x in run["final_val_loss_by_seed"] if x is not None]
        if not losses:
            continue
        # axhline does not advance the colour cycle: one colour each.
        colour = f"C{index + 1}"
        axes.axhline(statistics.fmean(losses), linestyle="--", color=colour,
                     label=f"{name}: speedup {_number(speedup, '.2f')}")
        axes.axhspan(min(losses), max(losses), color=colour, alpha=0.15)
    axes.set_xscale("log")
    axes.set_xlabel("AdamW's step budget")
    axes.set_ylabel("final validation loss")
    axes.set_title(_title(report["settings"])
                   + ": Sophia's final loss on AdamW's budget curve",
                   fontsize=9)
    axes.legend(fontsize=8)
    figure.savefig(out / "adamw_budgets.png", dpi=100)


def _plot_diagnostics(report, results, runs, out):
    sophias = list(report["speedup_vs_adamw"])
    figure, axes = _figure(2, len(sophias), size=(4 * len(sophias), 6))
    axes = axes.reshape(2, len(sophias))
    for column, name in enumerate(sophias):
        chosen = {run["folder"] for run in results[name]["seeds"]}
        # Grey first, so the best setting's lines are drawn over them.
        for run in sorted((run for run in runs if run["contender"] == name),
                          key=lambda run: run["folder"] in chosen):
            points = run["diagnostics"]
            colour = {"color": "C0"} if run["folder"] in chosen else {
                "color": "0.75", "linewidth": 0.7}
            for row in (0, 1):
                axes[row, column].plot([p[0] for p in points],
                                       [p[row + 1] for p in points],
                                       **colour)
        axes[0, column].set_title(f"{name}: best setting (blue), every run "
                                  "(grey)", fontsize=8)
        axes[0, column].set_ylabel("win rate (not clipped)")
        axes[1, column].set_ylabel("||h||")
        axes[1, column].set_yscale("log")
        axes[1, column].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(out / "sophia_diagnostics.png", dpi=100)


def _finite(x):
    return x if x is not None and math.isfinite(x) else None
