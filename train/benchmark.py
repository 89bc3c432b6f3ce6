"""What Sophia costs next to AdamW: the update, the train step, the state.

    python -m train.benchmark                  # the numbers in BENCHMARKS.md
    python -m train.benchmark --quick          # a few minutes (smoke test)
    python -m train.benchmark --out FILE.json  # default: benchmark.json

Every figure is the median of repeated timings after warm-up, and every
ratio divides two medians measured in this process, turn about (Sophia,
AdamW, Sophia, ...), so a slower or busier machine shifts both alike.

* `apply_time_ratio_vs_adamw`: one XLA-compiled `optimizer.apply` of Sophia
  over one of Keras AdamW, on the variables of GPT-2 small (124M).
* `step_time_ratio_sophia_{g,h}_vs_adamw`: the train step of a small GPT-2,
  amortised over whole k-step cycles (k = 10, so one refresh per cycle),
  eagerly built graphs and XLA; for the full batch and for the Hessian
  estimated on half (`hessian_batch_fraction=0.5`, as in the paper) and a
  quarter of it.
  `step_time_ratio_range_sophia_{g,h}_vs_adamw`: the smallest and largest
  ratio of one cycle to AdamW's cycle of the same round, for the noise.
* `state_bytes_per_param_bytes`: optimizer state per byte of parameters.
"""

import argparse
import json
import os
import platform
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

import keras_sophia
from models import gpt2

# Default mode: GPT-2 small's variables for the update; the tiny GPT-2
# (2 layers, width 128, GPT-2's vocabulary) at batch 16 x 64 tokens, the
# pretraining default, for the step. --quick: smaller and fewer repeats.
MODES = {
    "full": {"apply_model": "125m", "apply_repeats": 15, "batch_size": 16,
             "block_size": 64, "cycles": 8, "warmup_cycles": 1,
             "jit_compile": [False, True], "fractions": [1.0, 0.5, 0.25]},
    # Every model traced costs ~30 s here, so few of them.
    "quick": {"apply_model": "tiny", "apply_repeats": 5, "batch_size": 2,
              "block_size": 16, "cycles": 2, "warmup_cycles": 1,
              "jit_compile": [False], "fractions": [1.0, 0.5]},
}
INTERVAL = 10  # k: one Hessian refresh per cycle of 10 steps
# Share of the batch the Hessian is estimated on: all of it, the paper's
# half (240 of 480), and a quarter; and how results name them.
FRACTIONS = {1.0: "", 0.5: "_half_batch", 0.25: "_quarter_batch"}
LABELS = {False: "graph", True: "xla"}


def sophia(estimator="gnb", fraction=1.0):
    return keras_sophia.Sophia(
        learning_rate=1e-4, weight_decay=0.1, estimator=estimator,
        hessian_update_interval=INTERVAL, hessian_batch_fraction=fraction,
        seed=0,
    )


def adamw():
    return keras.optimizers.AdamW(learning_rate=1e-4, weight_decay=0.1)


def lion():
    return keras.optimizers.Lion(learning_rate=1e-4, weight_decay=0.1)


def alternate(timers, repeats, warmup=1):
    """Median seconds of each zero-argument timer, run in turn."""
    for timer in timers.values():
        for _ in range(warmup):
            timer()
    times = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            start = time.perf_counter()
            timer()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def apply_times(model_name, repeats):
    """Median seconds of one compiled apply, per optimizer."""
    model = gpt2.build(model_name, block_size=1024)
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    grads = [
        tf.constant(rng.normal(size=v.shape).astype("float32") * 1e-3)
        for v in variables
    ]
    timers = {}
    for name, optimizer in (("sophia", sophia()), ("adamw", adamw())):
        optimizer.build(variables)
        if name == "sophia":
            # A realistic h (and no "no Hessian" warning).
            optimizer.update_hessian([tf.abs(g) for g in grads], variables)
        # The weights are the model's own variables, so both optimizers
        # update the same memory; one compiled function each.
        apply = tf.function(
            lambda g, o=optimizer: o.apply(g, variables), jit_compile=True
        )

        def timer(apply=apply):
            apply(grads)
            # Wait for the update: reading one weight syncs the stream.
            variables[0].numpy()

        timers[name] = timer
    times = alternate(timers, repeats)
    parameters = sum(int(np.prod(v.shape)) for v in variables)
    return parameters, times


def step_model(settings, optimizer, jit):
    keras.utils.set_random_seed(0)
    model = gpt2.build("tiny", block_size=settings["block_size"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return model


def step_times(settings, jit):
    """Median seconds per train step over whole k-step cycles (k = 10,
    so each holds one refresh), and of refresh and ordinary steps."""
    batch, block = settings["batch_size"], settings["block_size"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, gpt2.VOCAB_SIZE, size=(8, batch, block + 1))
    batches = [
        ({"token_ids": t[:, :-1], "padding_mask": np.ones_like(t[:, :-1])},
         t[:, 1:])
        for t in tokens
    ]
    dataset = tf.data.Dataset.from_tensor_slices(
        tf.nest.map_structure(lambda *b: np.stack(b), *batches)
    ).repeat().prefetch(2)
    optimizers = {"adamw": adamw()}
    for estimator, letter in (("gnb", "g"), ("hutchinson", "h")):
        for fraction in settings["fractions"]:
            optimizers[f"sophia_{letter}{FRACTIONS[fraction]}"] = sophia(
                estimator, fraction
            )
    steps = {}
    for name, optimizer in optimizers.items():
        model = step_model(settings, optimizer, jit)
        function = model.make_train_function()
        iterator = iter(dataset)
        steps[name] = lambda f=function, i=iterator: f(i)
    # Step by step, each waited for (reading its loss), so refresh steps
    # (the first of each cycle) and ordinary steps are timed apart.
    times = {name: [] for name in steps}
    cycles = settings["warmup_cycles"] + settings["cycles"]
    for cycle in range(cycles):
        for name, step in steps.items():
            for _ in range(INTERVAL):
                start = time.perf_counter()
                float(step()["loss"])
                if cycle >= settings["warmup_cycles"]:
                    times[name].append(time.perf_counter() - start)
    result = {}
    for name, seconds in times.items():
        per_cycle = np.reshape(seconds, (-1, INTERVAL))
        result[name] = {
            # The figure the ratios use: a whole cycle, per step.
            "step": statistics.median(per_cycle.sum(axis=1)) / INTERVAL,
            "refresh_step": statistics.median(per_cycle[:, 0]),
            "ordinary_step": statistics.median(per_cycle[:, 1:].ravel()),
            "cycles": list(per_cycle.sum(axis=1) / INTERVAL),
        }
    return result


def state_bytes():
    """Bytes of per-parameter optimizer state per byte of parameters
    (scalars such as `iterations` left out: a few bytes in all)."""
    model = gpt2.build("tiny", block_size=64)
    variables = model.trainable_variables
    size = sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables
    )
    ratios = {}
    for name, optimizer in (("sophia", sophia()), ("adamw", adamw()),
                            ("lion", lion())):
        optimizer.build(variables)
        state = sum(
            int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
            for v in optimizer.variables if len(v.shape) > 0
        )
        ratios[name] = state / size
    return ratios


def machine():
    processor = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")]
        processor = names[0] if names else processor
    return {
        "platform": platform.platform(),
        "processor": processor,
        "cpus": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def run(mode):
    """Every measurement of `mode` ("full" or "quick"), as one dict."""
    settings = MODES[mode]
    parameters, applies = apply_times(
        settings["apply_model"], settings["apply_repeats"]
    )
    print(f"apply on {parameters:,} parameters: {applies}", flush=True)
    steps = {}
    for jit in settings["jit_compile"]:
        label = LABELS[jit]
        steps[label] = step_times(settings, jit)
        print(f"train step ({label}): {steps[label]}", flush=True)
    result = {
        "apply_time_ratio_vs_adamw": applies["sophia"] / applies["adamw"],
    }
    for estimator in ("g", "h"):
        ratios, ranges = {}, {}
        for label, times in steps.items():
            for fraction in settings["fractions"]:
                suffix = FRACTIONS[fraction]
                sophia_times = times[f"sophia_{estimator}{suffix}"]
                ratios[label + suffix] = (
                    sophia_times["step"] / times["adamw"]["step"]
                )
                # Cycle i of Sophia over cycle i of AdamW (the same round
                # of turns): how far the noise moves one cycle's ratio.
                paired = np.divide(sophia_times["cycles"],
                                   times["adamw"]["cycles"])
                ranges[label + suffix] = [paired.min(), paired.max()]
        result[f"step_time_ratio_sophia_{estimator}_vs_adamw"] = ratios
        result[f"step_time_ratio_range_sophia_{estimator}_vs_adamw"] = ranges
    result["state_bytes_per_param_bytes"] = state_bytes()
    result["seconds"] = {"apply": applies, "train_step": steps}
    result["settings"] = {"mode": mode, "apply_parameters": parameters,
                          "hessian_update_interval": INTERVAL, **settings}
    result["machine"] = machine()
    return result


def markdown(result):
    """The result as a markdown table (ratios < 1: Sophia is cheaper)."""
    rows = [
        "| measure | Sophia / AdamW | one cycle's ratio, min-max | target |",
        "|---|---|---|---|",
        (f"| apply, {result['settings']['apply_parameters']:,} parameters "
         f"(XLA) | {result['apply_time_ratio_vs_adamw']:.3f} | | <= 0.85 |"),
    ]
    names = {"": "full", "_half_batch": "half", "_quarter_batch": "quarter"}
    for estimator, target in (("g", "1.03"), ("h", "1.08")):
        ratios = result[f"step_time_ratio_sophia_{estimator}_vs_adamw"]
        ranges = result[
            f"step_time_ratio_range_sophia_{estimator}_vs_adamw"]
        for label in map(LABELS.get, result["settings"]["jit_compile"]):
            for fraction in result["settings"]["fractions"]:
                suffix = FRACTIONS[fraction]
                rows.append(
                    f"| train step, Sophia-{estimator.upper()}, {label}, "
                    f"Hessian on the {names[suffix]} batch | "
                    f"{ratios[label + suffix]:.3f} | "
                    f"{ranges[label + suffix][0]:.2f}-"
                    f"{ranges[label + suffix][1]:.2f} | <= {target} |"
                )
    state = result["state_bytes_per_param_bytes"]
    rows.append(
        "| state bytes per parameter byte (Sophia, AdamW, Lion) | "
        f"{state['sophia']:.2f}, {state['adamw']:.2f}, {state['lion']:.2f}"
        " | | Sophia = AdamW |"
    )
    return "\n".join(rows + ["", profile(result)]) + "\n"


def profile(result):
    """Where the step time goes: ordinary and refresh steps apart, in
    milliseconds and in AdamW steps."""
    rows = [
        ("| optimizer | mode | ordinary step, ms (x AdamW) | refresh step, "
         "ms (x AdamW) |"),
        "|---|---|---|---|",
    ]
    for label, times in result["seconds"]["train_step"].items():
        base = times["adamw"]["step"]
        for name, t in times.items():
            rows.append(
                f"| {name} | {label} | {1e3 * t['ordinary_step']:.0f} "
                f"({t['ordinary_step'] / base:.2f}) | "
                f"{1e3 * t['refresh_step']:.0f} "
                f"({t['refresh_step'] / base:.2f}) |"
            )
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (minutes)")
    parser.add_argument("--out", default="benchmark.json",
                        help="the JSON file; the table goes next to it (.md)")
    args = parser.parse_args(argv)
    result = run("quick" if args.quick else "full")
    table = markdown(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
