"""Which details decide how well Sophia does? One change at a time to a
contender's best setting from `train.compare`, on the same seeds.

    python -m train.ablate                          # Sophia-G, runs/compare
    python -m train.ablate --contender sophia-h --seeds 2

Reads `compare.json` in `--compare` (the comparison must have finished),
trains the best setting with each change below in the comparison's own run
folder (so the unchanged runs are reused, not trained again) and writes
`ablate-CONTENDER.json` and `.md` there: each change's final validation
loss per seed, and its mean difference from the unchanged setting.
"""

import argparse
import json
import pathlib
import statistics

from train import require_tensorflow
from train import compare

# name: a function of the comparison's step budget giving the pretrain
# flags that change. The learning rate and rho are swept by the
# comparison itself; these are the other details the Sophia authors fix.
CHANGES = {
    # h is an EMA refreshed every k steps: k sets how many refreshes the
    # budget holds (k = 2: 1,000; k = 50: 40) and what a step costs.
    "k = 2": lambda steps: {"hessian_interval": 2},
    "k = 50": lambda steps: {"hessian_interval": 50},
    # Warmup: the steps taken while h is still a small part of its value.
    "warmup 2%": lambda steps: {"warmup": steps // 50},
    "warmup 25%": lambda steps: {"warmup": steps // 4},
    # beta_2 0.9: h reaches 1 - 0.9^n of its value in ~10x fewer refreshes.
    "beta_2 = 0.9": lambda steps: {"beta_2": 0.9},
    # The paper's stability claim: Sophia needs the clipping least.
    "no gradient clipping": lambda steps: {"grad_clip": 0},
    "no weight decay": lambda steps: {"weight_decay": 0},
}


def main(argv=None):
    require_tensorflow("train.ablate")
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--compare", default="runs/compare",
                        help="a finished train.compare output folder")
    parser.add_argument("--contender", default="sophia-g",
                        choices=compare.SOPHIAS)
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds 0..N-1 of each change")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs trained at once")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.compare)
    try:
        report = json.loads((out / "compare.json").read_text())
    except FileNotFoundError:
        parser.error(f"--compare: no compare.json in {out}; run "
                     "`python -m train.compare` first")
    if not 1 <= args.seeds <= report["settings"]["seeds"]:
        parser.error(f"--seeds must be in [1, {report['settings']['seeds']}]"
                     f" (the comparison's seeds); got {args.seeds}")
    settings = report["settings"]
    shared = {k: settings[k] for k in (
        "data", "model", "tokenizer", "steps", "cache_dir", "batch_size",
        "block_size", "hessian_interval", "log_interval", "jit",
        "eval_interval", "eval_steps")}
    best = report["best"][args.contender]
    runner = compare.Runner(out, shared, args.jobs)
    variants = {"unchanged": ()} | {
        name: tuple(change(settings["steps"]).items())
        for name, change in CHANGES.items()}
    futures = {name: [runner.submit(compare.Setting(
        args.contender, best["lr"], best["rho"], seed, extra=extra))
        for seed in range(args.seeds)] for name, extra in variants.items()}
    losses = {name: [f.result()["final_val_loss"] for f in fs]
              for name, fs in futures.items()}
    runner.pool.shutdown()
    result = {"contender": args.contender, "lr": best["lr"],
              "rho": best["rho"], "final_val_loss": losses}
    name = f"ablate-{args.contender}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _table(result)
    (out / f"{name}.md").write_text(table)
    print(table)


def _table(result):
    base = result["final_val_loss"]["unchanged"]
    rows = [f"{result['contender']} at lr {result['lr']:g}, rho "
            f"{result['rho']:g} (its best in the comparison):", "",
            "| change | final val loss per seed | mean - unchanged mean |",
            "|---|---|---|"]
    for name, losses in result["final_val_loss"].items():
        finite = None not in losses
        delta = (statistics.fmean(losses) - statistics.fmean(base)
                 if finite and None not in base else None)
        rows.append(
            f"| {name} | "
            + ", ".join("NaN" if x is None else f"{x:.4f}" for x in losses)
            + " | " + ("" if name == "unchanged" else
                       "NaN" if delta is None else f"{delta:+.4f}") + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
