"""Sophia-G and Sophia-H against AdamW and Lion, on equal terms (the
paper's Figure 1 at CPU scale).

    python -m train.compare            # about 55 min on 2 CPU cores
    python -m train.compare --quick    # smoke test, 1-2 min

Every run is `train.pretrain` with the same data (the embedded corpus),
model, batch, block, steps, warmup and cosine shape (`min_lr = lr / 20`),
evaluation and seed. Each optimizer gets a small learning-rate sweep, and
Sophia then a `rho` sweep at its best lr; the setting with the lowest
final validation loss is the one compared. `--out` (default `runs/compare`,
or `runs/compare-quick`) gets one run directory per setting in `runs/`,
`compare.json`, `compare.md`, `val_loss_vs_steps.png` and
`val_loss_vs_time.png`. A finished run is reused, so the same command
after a kill continues the comparison.

Full mode: the `tiny` model, 140 steps of 16 x 64 tokens, 16 runs.
Measured on an idle 2-core machine at 150 steps with 10 evaluations: an
AdamW run took 220 s (145 s of it training, 0.93 s a step), a Sophia-H
run 221 s (170 s training, 0.99 s a step, tracing 20 s longer). At 140
steps and 7 evaluations that makes 185-215 s a run and about 55 min for
the 16 (projected; the full mode has not been run to the end).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import platform
import time

import keras
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from train import configs
from train import pretrain

OPTIMIZERS = ("sophia-g", "sophia-h", "adamw", "lion")

# Settings every run shares. 140 steps of 1,024 tokens are 0.58 of an
# epoch of the corpus; warmup is the first 10%; 7 evaluations a curve. Every run is validated on
# the same 6 batches (6,144 tokens, half the validation split: all of it
# would double the time spent validating).
FULL = {
    "data": "austen", "model": "tiny", "steps": 140, "batch_size": 16,
    "block_size": 64, "warmup": 14, "eval_interval": 20, "eval_steps": 6,
    "log_interval": 20, "hessian_interval": 10, "seed": 0,
}
QUICK = {
    **FULL, "steps": 8, "batch_size": 4, "block_size": 32, "warmup": 2,
    "eval_interval": 4, "eval_steps": 2, "log_interval": 4,
    "hessian_interval": 4,
}

# Learning rates, three each (what fits the hour), factors of 2 apart.
# AdamW: around the pretrain default, 2e-3. Lion: 1.7-6.7x lower, as its
# authors advise 3-10x lower than AdamW. Sophia: its update is clipped to
# lr per coordinate, and in runs this short h is a small part of what its
# EMA (beta_2 0.99, no bias correction, 14 refreshes) converges to, so
# 96-99% of coordinates are clipped (win rate measured 1-4%): Sophia moves
# like sign momentum and wants a Lion-like lr. Measured over 150 steps
# (val loss, whole validation split): AdamW 2e-3 5.79; Sophia-G 2e-3
# 6.07, 1e-3 5.97; beta_2 0.9 instead of 0.99 only gave 6.03 at 2e-3.
LRS = {
    "sophia-g": (5e-4, 1e-3, 2e-3),
    "sophia-h": (5e-4, 1e-3, 2e-3),
    "adamw": (1e-3, 2e-3, 4e-3),
    "lion": (3e-4, 6e-4, 1.2e-3),
}
# Sophia's rho: the lr sweep runs at the first value (the paper's: 0.05
# for Sophia-G, 0.01 for Sophia-H), then the others at the best lr. Both
# go up, 4x and 16x: a larger rho clips fewer coordinates, and the win
# rates above are far below the 10-50% the Sophia authors aim for.
RHOS = {"sophia-g": (0.05, 0.2, 0.8), "sophia-h": (0.01, 0.04, 0.16)}
# --quick: one setting each, plus a second rho for Sophia-G so that the
# rho sweep runs too (each run is mostly tracing: 10-20 s).
QUICK_LRS = {"sophia-g": (2e-3,), "sophia-h": (2e-3,), "adamw": (2e-3,),
             "lion": (4e-4,)}
QUICK_RHOS = {"sophia-g": (0.05, 0.2), "sophia-h": (0.01,)}
# The same min_lr / lr for everyone: one schedule shape.
MIN_LR_FACTOR = 1 / 20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and sweep, for a smoke test")
    parser.add_argument("--out", help="default: runs/compare(-quick)")
    parser.add_argument("--cache-dir", default=pretrain.Config.cache_dir,
                        help="the token cache")
    args = parser.parse_args(argv)
    shared = dict(QUICK if args.quick else FULL, cache_dir=args.cache_dir)
    lrs, rhos = (QUICK_LRS, QUICK_RHOS) if args.quick else (LRS, RHOS)
    out = pathlib.Path(args.out or (
        "runs/compare-quick" if args.quick else "runs/compare"))
    total = sum(len(lrs[name]) + len(rhos.get(name, ())[1:])
                for name in OPTIMIZERS)
    runs, best = [], {}
    for name in OPTIMIZERS:
        rho = rhos[name][0] if name in rhos else None
        tried = [_run(out, shared, name, lr, rho, runs, total)
                 for lr in lrs[name]]
        lr = _best(tried)["lr"]
        tried += [_run(out, shared, name, lr, rho, runs, total)
                  for rho in rhos.get(name, ())[1:]]
        best[name] = _best(tried)
    report = _report(shared, lrs, rhos, runs, best)
    out.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a diverged loss is stored as null, never as NaN.
    (out / "compare.json").write_text(
        json.dumps(report, indent=2, allow_nan=False))
    table = _table(report)
    (out / "compare.md").write_text(table)
    _plot(best, report["adamw_best_val_loss"], shared, out)
    print(table)
    print(f"compare.json, compare.md and the plots are in {out}")
    return report


def _run(out, shared, name, lr, rho, runs, total):
    """Trains one setting (or reuses its finished run); its summary."""
    label = f"{name}-lr{lr:g}" + (f"-rho{rho:g}" if rho is not None else "")
    folder = out / "runs" / label
    # Each optimizer's weight decay from the paper's runs (train/configs.py):
    # 0.2 Sophia, 0.1 AdamW, 1.0 Lion (whose lr is 3-10x smaller).
    weight_decay = configs.CONFIGS[f"gpt2-small-{name}"]["weight_decay"]
    flags = dict(shared, optimizer=name, lr=lr, min_lr=lr * MIN_LR_FACTOR,
                 weight_decay=weight_decay, out=str(folder))
    if rho is not None:
        flags["rho"] = rho
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    config = dataclasses.asdict(pretrain.parse_config(argv))
    saved = folder / "config.json"
    finished = ((folder / "final.weights.h5").exists() and saved.exists()
                and json.loads(saved.read_text()) == config)
    print(f"run {len(runs) + 1}/{total}: {label}", flush=True)
    started = time.perf_counter()
    if not finished:
        folder.mkdir(parents=True, exist_ok=True)
        keras.backend.clear_session()
        # Keras's progress bars go to the run's log, not the report.
        with open(folder / "log.txt", "a") as log, \
                contextlib.redirect_stdout(log):
            pretrain.main(argv)
    curve = read_val_curve(folder / "metrics.jsonl")
    run = {"optimizer": name, "lr": lr, "rho": rho,
           "weight_decay": weight_decay, "folder": str(folder),
           "final_val_loss": _finite(curve[-1][2]),
           "seconds_per_step": _seconds_per_step(curve), "curve": curve}
    loss = run["final_val_loss"]
    print(f"  final validation loss "
          f"{'NaN (diverged)' if loss is None else f'{loss:.4f}'}"
          + (" (finished before: reused)" if finished else
             f" ({time.perf_counter() - started:.0f} s)"), flush=True)
    runs.append(run)
    return run


def read_val_curve(path):
    """[[step, time, val_loss], ...] from a metrics.jsonl, by step. A step
    logged twice (work redone after a resume) keeps its last line."""
    lines = map(json.loads, pathlib.Path(path).read_text().splitlines())
    points = {x["step"]: [x["step"], x["time"], x["val_loss"]]
              for x in lines if "val_loss" in x}
    return [points[step] for step in sorted(points)]


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
        if loss <= target:  # False for NaN: a diverged run never reaches
            if previous is None or not math.isfinite(previous[1]):
                return x
            x0, loss0 = previous
            return x0 + (x - x0) * (loss0 - target) / (loss0 - loss)
        previous = x, loss
    return None


def _best(tried):
    # A diverged run (NaN, stored as None) counts as the worst.
    return min(tried, key=lambda run: math.inf
               if run["final_val_loss"] is None else run["final_val_loss"])


def _seconds_per_step(curve):
    # From the first evaluation on: the first interval includes tracing.
    (step0, time0, _), (step1, time1, _) = curve[0], curve[-1]
    return (time1 - time0) / (step1 - step0) if step1 > step0 else None


def _finite(x):
    return x if math.isfinite(x) else None


def _report(shared, lrs, rhos, runs, best):
    target = best["adamw"]["final_val_loss"]
    steps, adamw_time = shared["steps"], best["adamw"]["curve"][-1][1]
    summary = {}
    for name, run in best.items():
        reached = None if target is None else first_reach(
            [(step, loss) for step, _, loss in run["curve"]], target)
        seconds = None if target is None else first_reach(
            [(time_, loss) for _, time_, loss in run["curve"]], target)
        summary[name] = dict(
            {k: v for k, v in run.items() if k != "curve"},
            steps_ratio_vs_adamw=None if reached is None
            else reached / steps,
            time_ratio_vs_adamw=None if seconds is None
            else seconds / adamw_time,
            curve=[[step, time_, _finite(loss)]
                   for step, time_, loss in run["curve"]],
        )
    sophias = ("sophia-g", "sophia-h")
    return {
        "steps_ratio_sophia_vs_adamw": {
            name: summary[name]["steps_ratio_vs_adamw"] for name in sophias},
        "time_ratio_sophia_vs_adamw": {
            name: summary[name]["time_ratio_vs_adamw"] for name in sophias},
        "adamw_best_val_loss": target,
        "best": summary,
        "runs": [{k: v for k, v in run.items() if k != "curve"}
                 for run in runs],
        "settings": dict(shared, lrs=lrs, rhos=rhos,
                         min_lr_factor=MIN_LR_FACTOR),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
    }


def _table(report):
    def ratio(x):
        return "not reached" if x is None else f"{x:.2f}"

    def number(x, spec):
        return "NaN" if x is None else format(x, spec)

    def setting(value, grid):
        # A best value at the edge of its grid may not be the optimum.
        if value is None:
            return ""
        edge = len(grid) > 1 and value in (min(grid), max(grid))
        return f"{value:g}" + (" (edge)" if edge else "")

    settings = report["settings"]
    rows = [
        ("| optimizer | best lr | best rho | final val loss | steps ratio "
         "vs AdamW | time ratio vs AdamW | s/step |"),
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in report["best"].items():
        rows.append(
            f"| {name} | {setting(run['lr'], settings['lrs'][name])} | "
            f"{setting(run['rho'], settings['rhos'].get(name, ()))} | "
            f"{number(run['final_val_loss'], '.4f')} | "
            f"{ratio(run['steps_ratio_vs_adamw'])} | "
            f"{ratio(run['time_ratio_vs_adamw'])} | "
            f"{number(run['seconds_per_step'], '.2f')} |")
    rows += [
        "",
        ("steps ratio: steps to reach AdamW's best final validation loss "
         "(interpolated between evaluations) / AdamW's steps; the paper "
         "claims 0.5 for Sophia. time ratio: the same in training seconds. "
         "s/step: training seconds per step after the first evaluation. "
         "(edge): the best value is at the edge of its grid."),
    ]
    return "\n".join(rows) + "\n"


def _plot(best, target, shared, out):
    for column, xlabel, name in (
        (0, "step", "val_loss_vs_steps.png"),
        (1, "training time (s, validation excluded)", "val_loss_vs_time.png"),
    ):
        # matplotlib's object API on an Agg canvas: no pyplot, no global
        # backend to set.
        figure = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(figure)
        axes = figure.subplots()
        for optimizer, run in best.items():
            rho = "" if run["rho"] is None else f", rho={run['rho']:g}"
            axes.plot([point[column] for point in run["curve"]],
                      [point[2] for point in run["curve"]], marker=".",
                      label=f"{optimizer} (lr={run['lr']:g}{rho})")
        if target is not None:
            axes.axhline(target, color="gray", linestyle="--",
                         label="AdamW's best final")
        axes.set_xlabel(xlabel)
        axes.set_ylabel("validation loss")
        axes.set_title(
            f"GPT-2 {shared['model']}, {shared['steps']} steps of "
            f"{shared['batch_size']} x {shared['block_size']} tokens: "
            "each optimizer's best setting")
        axes.legend()
        figure.savefig(out / name, dpi=100)


if __name__ == "__main__":
    main()
