"""Is Sophia worth it? Sophia-G, Sophia-H and Sophia-G on half the batch
against a tuned AdamW and Lion, under one protocol fixed before any result.

    python -m train.compare                  # byte-s on austen, ~90 min
    python -m train.compare --model byte-m --transfer runs/compare --seeds 2
    python -m train.compare --data text:DIR --out runs/other
    python -m train.compare --quick          # smoke test, a few minutes

The protocol (BENCHMARKS.md says it in prose):

* Every run is `train.pretrain` with the same data, data order, model,
  batch, block, steps (2,000 by default: 200 Hessian refreshes at k = 10),
  and schedule shape: linear warmup over the first 10% of the steps, then
  cosine decay to lr / 20 at the last step. Runs are ranked on their final
  validation loss over the whole validation split, never on an earlier
  point of their curve.
* Each contender gets a learning-rate grid of five values a factor of 2
  apart (but Sophia-G on half the batch, which runs at Sophia-G's best
  setting: `FOLLOWERS`); while its best value is the largest or smallest
  tried, the grid goes on past that edge (at most `MAX_EXTENSIONS` runs a sweep). Sophia
  runs the lr sweep at rho 0.05 (the paper's GPT-2 small value), then a
  rho sweep (three values a factor of 4 apart, extended the same way) at
  the best lr, then, if another rho won, the lr's neighbours at that rho.
* The best setting of each contender is trained again with seeds 1 to
  `--seeds` - 1 (data order, initialisation, estimator draws).
* AdamW's best setting is also trained for 0.5x, 0.75x, 1.5x and 2x the
  steps, each with its own full schedule. The AdamW budget whose final
  loss matches a Sophia variant's mean final loss, interpolated in
  log(budget), is `speedup_vs_adamw` (the paper claims 2.0; below 1.0
  Sophia is worse; "not reached" below 0.5x, "above 2x" beyond 2x).

`--transfer DIR` is the cheaper protocol for a second, larger model: the
full one at byte-m would take ~6 hours here. It reads the finished
comparison in DIR and gives AdamW, Sophia-G and Sophia-H (`TRANSFERRED`) a
grid of three learning rates a factor of 2 apart centred on their best
there, extended past an edge as above, at their rho from there (no rho
sweep); the seeds and AdamW budgets are as above. Lion and the half-batch
Sophia-G are left out.

Runs go `--jobs` at a time in separate processes (default 2, one core
each: on tiny models two one-thread runs get more done than one two-thread
run, and tracing is single-threaded). A finished run is reused and a
killed one resumes from its checkpoint, so the same command after a crash
goes on where it stopped. `--out` (default `runs/compare`) gets `runs/`,
`compare.json`, `compare.md` and the plots (see `train/compare_report.py`).
"""

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import threading
import time

from train import require_tensorflow
from train import compare_report
from train import data
from train import pretrain

# name: the pretrain flags that make the contender.
CONTENDERS = {
    "sophia-g": {"optimizer": "sophia-g"},
    "sophia-h": {"optimizer": "sophia-h"},
    # The paper's setting: h estimated on half of each batch.
    "sophia-g-half": {"optimizer": "sophia-g", "hessian_batch_fraction": 0.5},
    "adamw": {"optimizer": "adamw"},
    "lion": {"optimizer": "lion"},
}
SOPHIAS = ("sophia-g", "sophia-h", "sophia-g-half")
# Contenders run at another's best setting instead of a sweep of their
# own: the one cut made for time (a sweep of its own would add eight
# runs, about 20 minutes; the whole protocol takes ~115 minutes here). The paper ran
# the half-batch estimate with the hyperparameters of the full one.
FOLLOWERS = {"sophia-g-half": "sophia-g"}

# Learning-rate grids, five values a factor of 2 apart, centred where a
# first look at the byte-level model put each optimizer (issue #14):
# AdamW near 6e-3; Lion 3-10x below AdamW, as its authors advise; Sophia,
# whose clipped steps move a coordinate by lr like Lion's sign steps, in
# Lion's range and below.
LRS = {
    "sophia-g": (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3),
    "sophia-h": (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3),
    "sophia-g-half": (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3),
    "adamw": (1.5e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2),
    "lion": (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
}
# rho: the lr sweep runs at the paper's GPT-2 small value, the rho sweep
# at the best lr. Larger rho clips fewer coordinates.
RHO_START = 0.05
RHOS = (0.0125, 0.05, 0.2)
MAX_EXTENSIONS = 3
# Each optimizer's weight decay from the paper's runs: 0.2 Sophia, 0.1
# AdamW, 1.0 Lion (whose lr is 3-10x smaller).
WEIGHT_DECAY = {"sophia-g": 0.2, "sophia-h": 0.2, "sophia-g-half": 0.2,
                "adamw": 0.1, "lion": 1.0}
MIN_LR_FACTOR = 1 / 20
WARMUP_FRACTION = 1 / 10
# AdamW's budgets, in multiples of the step budget.
BUDGETS = (0.5, 0.75, 1.0, 1.5, 2.0)

# The shared settings: blocks of 64, 16 a batch, a log line every 20 steps
# (win rate and ||h|| over time), an evaluation every 1/20 of the steps
# (so that every budget's step count is a whole number of evaluations).
SHARED = {"batch_size": 16, "block_size": 64, "hessian_interval": 10,
          "log_interval": 20, "jit": True}
QUICK = {"batch_size": 4, "block_size": 16, "hessian_interval": 2,
         "log_interval": 2, "jit": False}
QUICK_LRS = {name: grid[2:3] for name, grid in LRS.items()}
QUICK_RHOS = (0.05, 0.2)
TRANSFERRED = ("sophia-g", "sophia-h", "adamw")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One run: a contender, its lr and rho, a seed, a step budget and
    any other pretrain flags (`train.ablate`'s changes)."""
    contender: str
    lr: float
    rho: float = None
    seed: int = 0
    steps: int = None  # None: the comparison's budget
    extra: tuple = ()  # ((flag, value), ...), applied last

    def label(self):
        return (f"{self.contender}-lr{self.lr:g}"
                + (f"-rho{self.rho:g}" if self.rho is not None else "")
                + (f"-seed{self.seed}" if self.seed else "")
                + (f"-steps{self.steps}" if self.steps else "")
                + "".join(f"-{k.replace('_', '-')}{v:g}"
                          for k, v in self.extra))


def tune(contender, lrs, rhos, seeds, extensions, steps, rho=RHO_START):
    """The protocol for one contender, as a generator: it yields lists of
    `Setting`s to train and receives their runs (dicts with
    `final_val_loss`); it returns `{"best", "seeds", "budgets"}`. The lr
    sweep runs at `rho` (Sophia only)."""
    sophia = contender in SOPHIAS
    rho = rho if sophia else None
    tried = yield from sweep(
        "lr", lrs, lambda lr: Setting(contender, lr, rho), extensions)
    best = best_run(tried)
    if sophia:
        tried += yield from sweep(
            "rho", rhos, lambda r: Setting(contender, best["lr"], r),
            extensions, known=[run for run in tried
                               if run["lr"] == best["lr"]])
        if best_run(tried)["rho"] != rho:
            # lr and rho trade off (the unclipped step is lr m / (rho h)):
            # the lr's neighbours again at the new rho.
            best = best_run(tried)
            lr = best["lr"]
            tried += yield from sweep(
                "lr", (lr / 2, lr, lr * 2),
                lambda x: Setting(contender, x, best["rho"]), extensions,
                known=[best])
        best = best_run(tried)
    setting = best["setting"]
    again = yield [dataclasses.replace(setting, seed=seed)
                   for seed in range(1, seeds)]
    budgets = []
    if contender == "adamw":
        budgets = yield [dataclasses.replace(setting, steps=round(b * steps))
                         for b in BUDGETS if b != 1.0]
    return {"best": best, "seeds": [best] + again, "budgets": budgets}


def sweep(key, grid, make, extensions, known=()):
    """Trains `make(value)` for every value of the geometric `grid` (of the
    setting `key`) not among the runs `known`; then, while the best run's
    value is the largest or smallest tried, one grid ratio beyond it, at
    most `extensions` times. Returns the runs it trained."""
    done = {run[key] for run in known}
    new = yield [make(value) for value in grid if value not in done]
    ratio = grid[1] / grid[0] if len(grid) > 1 else None
    for _ in range(extensions if ratio else 0):
        tried = list(known) + new
        values = sorted(run[key] for run in tried)
        best = best_run(tried)[key]
        if best not in (values[0], values[-1]):
            break
        step = ratio if best == values[-1] else 1 / ratio
        # Rounded, so that 1e-3 * 2 is 0.002 in labels and configs.
        new += yield [make(float(f"{best * step:.6g}"))]
    return new


def best_run(runs):
    # A diverged run (NaN, stored as None) counts as the worst.
    return min(runs, key=lambda run: math.inf
               if run["final_val_loss"] is None else run["final_val_loss"])


class Runner:
    """Trains settings in `jobs` parallel processes; each setting once."""

    def __init__(self, out, shared, jobs):
        self.out, self.shared, self.jobs = out, shared, jobs
        self.pool = concurrent.futures.ThreadPoolExecutor(jobs)
        self.futures, self.lock = {}, threading.Lock()
        self.finished, self.trained_seconds = 0, 0.0
        self.started = time.monotonic()

    def submit(self, setting):
        with self.lock:
            if setting not in self.futures:
                self.futures[setting] = self.pool.submit(self._run, setting)
            return self.futures[setting]

    def flags(self, setting):
        flags = dict(
            self.shared, **CONTENDERS[setting.contender], lr=setting.lr,
            min_lr=setting.lr * MIN_LR_FACTOR, seed=setting.seed,
            weight_decay=WEIGHT_DECAY[setting.contender],
            out=str(self.out / "runs" / setting.label()))
        steps = setting.steps or flags["steps"]
        flags.update(steps=steps, warmup=round(steps * WARMUP_FRACTION))
        if setting.rho is not None:
            flags["rho"] = setting.rho
        flags.update(setting.extra)
        return [f"--{k.replace('_', '-')}" if v is True
                else f"--{k.replace('_', '-')}={v}"
                for k, v in flags.items() if v is not False]

    def _run(self, setting):
        argv = self.flags(setting)
        config = pretrain.parse_config(argv)
        folder = pathlib.Path(config.out)
        saved = folder / "config.json"
        reused = ((folder / "final.weights.h5").exists() and saved.exists()
                  and json.loads(saved.read_text())
                  == pretrain.saved_config(config))
        began = time.monotonic()
        if not reused:
            folder.mkdir(parents=True, exist_ok=True)
            threads = str(max(1, (os.cpu_count() or 1) // self.jobs))
            env = dict(os.environ, TF_NUM_INTRAOP_THREADS=threads,
                       TF_NUM_INTEROP_THREADS=threads, TF_CPP_MIN_LOG_LEVEL="2")
            with open(folder / "log.txt", "a") as log:
                done = subprocess.run(
                    [sys.executable, "-m", "train.pretrain", *argv],
                    stdout=log, stderr=subprocess.STDOUT, env=env)
            if done.returncode:
                raise RuntimeError(
                    f"run {setting.label()} failed (exit status "
                    f"{done.returncode}); its log: {folder / 'log.txt'}")
        run = dict(dataclasses.asdict(setting), setting=setting,
                   steps=config.steps, folder=str(folder),
                   **compare_report.read_run(folder / "metrics.jsonl"))
        with self.lock:
            self.finished += 1
            if not reused:
                self.trained_seconds += time.monotonic() - began
            loss = run["final_val_loss"]
            print(f"[{self.finished} done, {len(self.futures) - self.finished}"
                  f" queued, {(time.monotonic() - self.started) / 60:.0f} min]"
                  f" {setting.label()}: final validation loss "
                  + ("NaN (diverged)" if loss is None else f"{loss:.4f}")
                  + (" (finished before: reused)" if reused else
                     f" ({time.monotonic() - began:.0f} s)"), flush=True)
        return run


def drive(protocols, runner, then):
    """Advances every contender's protocol as its runs finish; when one
    ends, `then(name, result)` may start others (a dict of protocols).
    Returns each protocol's result."""
    results, waiting = {}, {}

    def advance(name, response):
        try:
            request = protocols[name].send(response)
        except StopIteration as stop:
            results[name] = stop.value
            for follower, protocol in then(name, stop.value).items():
                protocols[follower] = protocol
                advance(follower, None)
            return
        waiting[name] = [runner.submit(setting) for setting in request]

    for name in list(protocols):
        advance(name, None)
    while waiting:
        # Only the runs still going: a finished one would wake the wait at
        # once, and the loop would spin until its siblings finish.
        concurrent.futures.wait(
            [f for futures in waiting.values() for f in futures
             if not f.done()],
            return_when=concurrent.futures.FIRST_COMPLETED)
        for name, futures in list(waiting.items()):
            if all(f.done() for f in futures):
                del waiting[name]
                advance(name, [f.result() for f in futures])
    return results


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="austen",
                        help="any source train.pretrain reads: austen, "
                             "openwebtext or text:PATH")
    parser.add_argument("--model", default="byte-s",
                        help="a size in models.gpt2.SIZES; byte-* sizes "
                             "read UTF-8 bytes, the others GPT-2's BPE")
    parser.add_argument("--steps", type=int,
                        help="the step budget of every run, a multiple of "
                             "20 (of 4 with --quick); default 2000 (8 with "
                             "--quick)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds of each contender's best setting")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs trained at once, each in its own process")
    parser.add_argument("--out", help="default: runs/compare(-quick)")
    parser.add_argument("--cache-dir", default=pretrain.Config.cache_dir,
                        help="the token cache")
    parser.add_argument("--transfer", metavar="DIR",
                        help="a finished comparison: tune only around its "
                             "best settings (for a larger --model)")
    parser.add_argument("--quick", action="store_true",
                        help="one lr each, tiny batches and 8 steps: checks "
                             "that the program runs, not the answer")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 8 if args.quick else 2000
    if args.transfer:
        if args.quick:
            parser.error("--transfer and --quick cannot be combined")
        try:
            args.transfer = json.loads(
                (pathlib.Path(args.transfer) / "compare.json").read_text())
        except (OSError, ValueError) as error:
            parser.error(f"--transfer: no readable compare.json in "
                         f"{args.transfer} ({error})")
    for name in ("steps", "seeds", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer; got "
                         f"{getattr(args, name)}")
    evaluations = _evaluations(args.quick)
    if args.steps % evaluations:
        parser.error(f"--steps must be a multiple of {evaluations}, so that"
                     " every AdamW budget is a whole number of evaluation "
                     f"intervals; got {args.steps}")
    return args


def _evaluations(quick):
    # Evaluations a run: every 1/20 of the steps (1/4 with --quick), so
    # that 0.5x, 0.75x, 1.5x and 2x the steps are whole intervals too.
    return 4 if quick else 20


def plan(args):
    """The protocols `drive` runs for these arguments: (protocols, then,
    grids), where `grids` has the contenders, their lr grids, the rho grid
    (or each Sophia's fixed rho under --transfer) and the planned number of
    tuning runs."""
    lrs, rhos = (QUICK_LRS, QUICK_RHOS) if args.quick else (LRS, RHOS)
    extensions = 0 if args.quick else MAX_EXTENSIONS
    contenders = list(CONTENDERS)
    if args.transfer:
        best = args.transfer["best"]
        contenders = list(TRANSFERRED)
        lrs = {name: (best[name]["lr"] / 2, best[name]["lr"],
                      best[name]["lr"] * 2) for name in contenders}
        rhos = {name: (best[name]["rho"],)
                for name in contenders if name in SOPHIAS}
    tuned = [name for name in contenders if name not in FOLLOWERS]
    sophias = [name for name in tuned if name in SOPHIAS]

    def rho_grid(name):
        return rhos[name] if args.transfer else rhos

    protocols = {name: tune(
        name, lrs[name], rho_grid(name) if name in SOPHIAS else (),
        args.seeds, extensions, args.steps,
        rho=rho_grid(name)[0] if args.transfer and name in SOPHIAS
        else RHO_START) for name in tuned}

    def then(name, result):
        # A follower takes its leader's best lr and rho, and its seeds.
        best = result["best"]
        return {follower: tune(follower, (best["lr"],), (best["rho"],),
                               args.seeds, 0, args.steps, rho=best["rho"])
                for follower, leader in FOLLOWERS.items()
                if leader == name and follower in contenders}

    planned = (sum(len(lrs[name]) for name in tuned)
               + len([name for name in FOLLOWERS if name in contenders])
               + sum(len(rho_grid(name)) - 1 for name in sophias))
    return protocols, then, {"contenders": contenders, "lrs": lrs,
                             "rhos": rhos, "planned": planned}


def main(argv=None):
    require_tensorflow("train.compare")
    args = parse_args(argv)
    out = pathlib.Path(args.out or (
        "runs/compare-quick" if args.quick else "runs/compare"))
    tokenizer = "bytes" if args.model.startswith("byte") else "gpt2"
    shared = dict(QUICK if args.quick else SHARED, data=args.data,
                  model=args.model, tokenizer=tokenizer, steps=args.steps,
                  cache_dir=args.cache_dir)
    shared["eval_interval"] = args.steps // _evaluations(args.quick)
    pretrain.parse_config(  # every pretrain flag checked before any run
        [f"--{k.replace('_', '-')}={v}" for k, v in shared.items()
         if not isinstance(v, bool)])
    # Every evaluation reads the whole validation split.
    _, val_ids = data.load_tokens(args.data, os.path.expanduser(
        args.cache_dir), tokenizer_name=tokenizer)
    windows = len(val_ids) // (shared["block_size"] + 1)
    shared["eval_steps"] = windows // shared["batch_size"]
    protocols, then, grids = plan(args)
    contenders = grids["contenders"]
    print(f"{len(contenders)} contenders; at least {grids['planned']} "
          f"tuning runs, {len(contenders) * (args.seeds - 1)} seed runs and "
          f"{len(BUDGETS) - 1} AdamW budget runs, {args.jobs} at a time; "
          f"results in {out}", flush=True)
    load = os.getloadavg()
    started = time.monotonic()
    runner = Runner(out, shared, args.jobs)
    results = drive(protocols, runner, then)
    results = {name: results[name] for name in contenders}
    runner.pool.shutdown()
    runs = [future.result() for future in runner.futures.values()]
    report = compare_report.report(
        results, runs, runner.flags, dict(
            shared, lrs=grids["lrs"], rhos=grids["rhos"], seeds=args.seeds,
            budgets=BUDGETS, min_lr_factor=MIN_LR_FACTOR,
            warmup_fraction=WARMUP_FRACTION, weight_decay=WEIGHT_DECAY,
            jobs=args.jobs, transferred_from=args.transfer
            and args.transfer["settings"]["model"]),
        load_start=load, seconds=time.monotonic() - started)
    compare_report.write(report, results, runs, out)
    return report


if __name__ == "__main__":
    main()
