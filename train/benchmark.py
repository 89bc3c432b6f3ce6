"""What Sophia costs next to AdamW: the update, the train step, the state.

    python -m train.benchmark                  # the numbers in BENCHMARKS.md
    python -m train.benchmark --quick          # a few minutes (smoke test)
    python -m train.benchmark --out FILE.json  # default: benchmark.json
    python -m train.benchmark --parts step,hvp # only some measurements
    python -m train.benchmark --parts jax      # Keras on JAX (jax extra)

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
* `step_time_floor_sophia_{g,h}`: the same ratio if a refresh cost only
  its extra FLOPs (see `benchmark_report.floor`), next to which the measured one is read.
* `peak_memory_ratio_vs_adamw`: the peak bytes the device (TensorFlow's
  CPU allocator) held during a short `train.pretrain` run of each Sophia
  variant over AdamW's, each in a fresh process
  (`train/peak_memory_child.py`);
  `process_memory_ratio_vs_adamw`: the same for the process's peak RSS.
  Its `*_jax` cells (`--parts jax`) are the same over the train step
  compiled by Keras's JAX backend, from XLA's buffer assignment (see
  `jax_peak_bytes`), whose bytes are `peak_memory_bytes`.
* `hvp_time_in_gradients`: a training gradient with one Hessian-vector
  product (Sophia-H's refresh), in training gradients, made reverse over
  reverse (what `EstimatorContext.hvp` does) and forward over reverse.
* `state_bytes_per_param_bytes`: optimizer state per byte of parameters.
* `jax_step_time_ratio_vs_adamw`: the same step ratio on Keras's JAX
  backend (XLA), Sophia-G and Sophia-H on the whole batch, from a child
  process with `KERAS_BACKEND=jax` (`--parts jax`; needs the `jax`
  extra); `jax_ordinary_step_ratio_vs_keras_step`: their ordinary steps
  over Sophia's step through Keras's own train step (the update alone,
  no refresh), which tells `SophiaTrainStep`'s cost from the update's.
* `load`: the load average at start and end, and the share of the CPUs
  other processes used during the run; `busy` flags a run whose timings
  load could have moved.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

import keras_sophia
from models import gpt2
from train import require_tensorflow
from train.benchmark_report import (FRACTIONS, INTERVAL, LABELS,
                                    cycle_floor, jax_adamw, jax_cell,
                                    markdown, size_of)

# Default mode: GPT-2 small's variables for the update; the tiny GPT-2
# (2 layers, width 128, GPT-2's vocabulary) at batch 16 x 64 tokens, the
# pretraining default, for the step. --quick: smaller and fewer repeats.
# XLA first: it is what GPUs and TPUs run, so it is the headline.
MODES = {
    "full": {"apply_model": "125m", "apply_repeats": 15, "batch_size": 16,
             "block_size": 64, "cycles": 8, "warmup_cycles": 1,
             "jit_compile": [True, False], "fractions": [1.0, 0.5, 0.25],
             "memory_steps": 50, "memory_flags": [], "memory_repeats": 3,
             "hvp_repeats": 20,
             # Where activations, not the vocabulary, take most memory.
             "second_size": {"memory_steps": 3, "memory_repeats": 2,
                             "memory_flags": [
                 "--model", "30m", "--batch-size", "4",
                 "--block-size", "1024"]},
             # Where parameters take most memory: GPT-2 small at one
             # sequence of 128 tokens per step (its logits are 5% of its
             # parameters' bytes).
             "parameter_size": {"memory_steps": 2, "memory_repeats": 1,
                                "memory_flags": [
                 "--model", "125m", "--batch-size", "1",
                 "--block-size", "128"]},
             # `fit` on arrays, at the first size.
             "arrays": {"memory_repeats": 1, "memory_flags": [
                 "--batch-size", "16", "--block-size", "64"]}},
    # Every model traced costs ~30 s here, so few of them.
    "quick": {"apply_model": "tiny", "apply_repeats": 5, "batch_size": 2,
              "block_size": 16, "cycles": 2, "warmup_cycles": 1,
              "jit_compile": [False], "fractions": [1.0, 0.5],
              "memory_steps": 2, "memory_repeats": 2,
              "memory_flags": ["--batch-size", "2", "--block-size", "16"],
              "hvp_repeats": 3,
              # 16 times the first size's tokens: its logits alone (0.1 GB)
              # outweigh how far graph-mode peaks move between runs.
              "second_size": {"memory_steps": 2, "memory_repeats": 1,
                              "memory_flags": [
                  "--model", "tiny", "--batch-size", "8",
                  "--block-size", "64"]},
              # The tiny GPT-2's logits at 1 x 16 tokens are an eighth of
              # its parameters' bytes.
              "parameter_size": {"memory_steps": 2, "memory_repeats": 1,
                                 "memory_flags": [
                  "--model", "tiny", "--batch-size", "1",
                  "--block-size", "16"]},
              "arrays": {"memory_repeats": 1, "memory_flags": [
                  "--batch-size", "2", "--block-size", "16"]}},
}
# The runs whose peak memory is measured, as `train.pretrain` flags.
MEMORY_RUNS = {
    "adamw": ["--optimizer", "adamw"],
    "sophia_g": ["--optimizer", "sophia-g"],
    "sophia_g_half_batch": ["--optimizer", "sophia-g",
                            "--hessian-batch-fraction", "0.5"],
    "sophia_h": ["--optimizer", "sophia-h"],
    "sophia_h_half_batch": ["--optimizer", "sophia-h",
                            "--hessian-batch-fraction", "0.5"],
}
# Other processes using more than this share of the CPUs during the run
# (or, where that is unknown, a 1-minute load average above this many
# runnable threads per CPU at the start) mark the run busy.
BUSY_SHARE = 0.05
BUSY_LOAD_PER_CPU = 0.25


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
    return {name: cycle_times(seconds) for name, seconds in times.items()}


def cycle_times(seconds):
    """One optimizer's step times, in order, cut into k-step cycles (each
    starting with its refresh step): the medians the tables use."""
    per_cycle = np.reshape(seconds, (-1, INTERVAL))
    return {
        # The figure the ratios use: a whole cycle, per step.
        "step": statistics.median(per_cycle.sum(axis=1)) / INTERVAL,
        "refresh_step": statistics.median(per_cycle[:, 0]),
        "ordinary_step": statistics.median(per_cycle[:, 1:].ravel()),
        "cycles": list(per_cycle.sum(axis=1) / INTERVAL),
    }


def hvp_times(settings):
    """Median seconds of one XLA-compiled training gradient, and of the
    gradient with one Hessian-vector product by each of the two ways of
    making it: reverse over reverse (differentiate <grad, v> once more, as
    `EstimatorContext.hvp` does) and forward over reverse (push v through
    the forward and backward pass with `tf.autodiff.ForwardAccumulator`,
    which needs v before the pass starts)."""
    batch, block = settings["batch_size"], settings["block_size"]
    keras.utils.set_random_seed(0)
    model = gpt2.build("tiny", block_size=block)
    variables = model.trainable_variables
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, gpt2.VOCAB_SIZE, size=(batch, block + 1))
    x = {"token_ids": tf.constant(tokens[:, :-1]),
         "padding_mask": tf.ones((batch, block), tf.int32)}
    y = tf.constant(tokens[:, 1:])
    probes = [tf.constant(rng.choice([-1.0, 1.0], size=v.shape), tf.float32)
              for v in variables]

    # The batch and probes are arguments, not captured constants, so XLA
    # cannot fold part of the passes away.
    def loss_of(x, y):
        return loss_fn(y, model(x, training=True))

    @tf.function(jit_compile=True)
    def gradient(x, y, probes):
        with tf.GradientTape() as tape:
            loss = loss_of(x, y)
        return [tf.convert_to_tensor(g)
                for g in tape.gradient(loss, variables)]

    @tf.function(jit_compile=True)
    def reverse_over_reverse(x, y, probes):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_of(x, y)
            grads = [tf.convert_to_tensor(g)
                     for g in inner.gradient(loss, variables)]
        return grads, outer.gradient(grads, variables,
                                     output_gradients=probes)

    @tf.function(jit_compile=True)
    def forward_over_reverse(x, y, probes):
        # The accumulator watches TensorFlow variables: each Keras
        # variable's `.value`.
        with tf.autodiff.ForwardAccumulator(
                [v.value for v in variables], probes) as forward:
            with tf.GradientTape() as tape:
                loss = loss_of(x, y)
            grads = [tf.convert_to_tensor(g)
                     for g in tape.gradient(loss, variables)]
        return grads, forward.jvp(grads)

    checked = check_products(reverse_over_reverse(x, y, probes)[1],
                             forward_over_reverse(x, y, probes)[1])

    def timer(function):
        def run():
            tf.nest.map_structure(
                lambda t: None if t is None else t.numpy(),
                function(x, y, probes))
        return run

    timers = {
        "gradient": timer(gradient),
        "reverse_over_reverse": timer(reverse_over_reverse),
        "forward_over_reverse": timer(forward_over_reverse),
    }
    seconds = alternate(timers, settings["hvp_repeats"])
    # Each compiled function's peak device bytes above what was already
    # held (the model, the batch, earlier parts' tensors), from one more
    # call.
    peaks = {}
    for name, run in timers.items():
        tf.config.experimental.reset_memory_stats("CPU:0")
        held = tf.config.experimental.get_memory_info("CPU:0")["current"]
        run()
        peaks[name] = (
            tf.config.experimental.get_memory_info("CPU:0")["peak"] - held)
    return seconds, peaks, checked


def check_products(reverse, forward, rtol=1e-3):
    """What the two ways made, checked before they are timed: a product
    for every variable from each, and forward over reverse's equal to
    reverse over reverse's within `rtol` of the largest entry (a way that
    returned no tangents would otherwise time a gradient alone). Raises
    RuntimeError naming the variable; returns the count and the largest
    difference over the largest entry."""
    missing = [i for i, products in enumerate(zip(reverse, forward))
               if any(product is None for product in products)]
    if missing:
        raise RuntimeError(f"no Hessian-vector product for variables "
                           f"{missing} of {len(reverse)}")
    reverse = [np.asarray(r) for r in reverse]
    scale = max(np.abs(r).max() for r in reverse)
    differences = [np.abs(np.asarray(f) - r).max() / scale
                   for r, f in zip(reverse, forward)]
    for i, difference in enumerate(differences):
        if not difference <= rtol:
            raise RuntimeError(
                f"forward over reverse's product of variable {i} differs "
                f"from reverse over reverse's by {difference:.2g} of the "
                f"largest entry (allowed: {rtol})")
    return {"variables": len(reverse),
            "largest_difference": float(max(differences))}


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


def cpu_seconds():
    """(seconds all CPUs were busy, seconds this process and its waited-for
    children used); the first is None where /proc/stat is missing."""
    own = sum(
        getattr(resource.getrusage(who), field)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for field in ("ru_utime", "ru_stime")
    )
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None, own
    # user nice system idle iowait irq softirq steal: all but idle, iowait.
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK"), own


def load(start, start_cpu, wall):
    """The machine's load over the run, and whether it was busy."""
    end = os.getloadavg()
    (busy_start, own_start), (busy_end, own_end) = start_cpu, cpu_seconds()
    cpus = os.cpu_count()
    others = None
    if busy_start is not None:
        others = max(0.0, (busy_end - busy_start) - (own_end - own_start))
        others /= wall * cpus
    return {
        "load_average_start": list(start),
        "load_average_end": list(end),
        "other_processes_cpu_share": others,
        # The load average also counts this program's own threads, and
        # for a minute or two whatever ran just before it; the CPU share
        # of other processes does not, so it decides where it is known.
        "busy": bool(others > BUSY_SHARE if others is not None
                     else start[0] > BUSY_LOAD_PER_CPU * cpus),
    }


def peak_memory(settings, jit, arrays=False):
    """Resident memory (`train/peak_memory_child.py`) of a short
    `train.pretrain` run per optimizer variant, each in a fresh process;
    with `arrays`, of `fit` on NumPy arrays instead (`train.fit_memory`).

    Without XLA the graph executor runs independent ops at once in an
    order that changes from run to run, and so does its peak (measured on
    the tiny GPT-2: AdamW's from 0.41 to 0.45 GB in three runs): there
    each variant runs `memory_repeats` times, in turn, and its peak is the
    largest, the one a batch must fit. XLA plans its buffers when it
    compiles: one run each."""
    repeats = 1 if jit else settings["memory_repeats"]
    peaks = {name: [] for name in MEMORY_RUNS}
    for _ in range(repeats):
        for name, flags in MEMORY_RUNS.items():
            peaks[name].append(_run_peak(settings, jit, flags, arrays))
    return {name: {"device": max(run["device"] for run in runs),
                   "process": max(run["process"] for run in runs),
                   "runs": runs}
            for name, runs in peaks.items()}


def _run_peak(settings, jit, flags, arrays=False):
    """The peaks of one `train.pretrain` run with `flags` (or of
    `train.fit_memory`), in a child."""
    with tempfile.TemporaryDirectory() as out:
        peak_file = os.path.join(out, "peak")
        if arrays:
            command = [sys.executable, "-m", "train.fit_memory", peak_file]
        else:
            steps = settings["memory_steps"]
            command = [
                sys.executable, "-m", "train.peak_memory_child", peak_file,
                "--steps", str(steps), "--eval-interval", str(steps),
                "--eval-steps", "2", "--warmup", "1",
                "--out", os.path.join(out, "run")]
        command += [*flags, *settings["memory_flags"]] + (
            ["--jit"] if jit else [])
        child = subprocess.run(command, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        if child.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {child.returncode}:\n"
                + child.stderr[-2000:])
        with open(peak_file) as f:
            return json.load(f)


def add_memory(result, memory):
    """Puts the peaks `memory` ({label: {run: peaks}}) and their ratios to
    AdamW's into `result`, beside those of other sizes."""
    ratios = memory_ratios(memory)
    result.setdefault("peak_memory_ratio_vs_adamw", {}).update(
        ratios["device"])
    result.setdefault("process_memory_ratio_vs_adamw", {}).update(
        ratios["process"])
    result.setdefault("memory_bytes", {}).update(memory)


def memory_ratios(memory):
    """Each Sophia run's peak over AdamW's, of the device's bytes and of
    the whole process."""
    ratios = {"device": {}, "process": {}}
    for label, runs in memory.items():
        for name, run in runs.items():
            if name != "adamw":
                for kind in ratios:
                    ratios[kind][f"{name}_{label}"] = (
                        run[kind] / runs["adamw"][kind])
    return ratios


# What the JAX child reads of `memory_analysis()`, in bytes.
JAX_MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes",
                     "alias_size_in_bytes", "temp_size_in_bytes",
                     "generated_code_size_in_bytes")


def jax_train_step(settings):
    """`step_times` of AdamW, Sophia-G and Sophia-H (whole batch) on
    Keras's JAX backend, and the `memory_analysis()` of each memory run's
    compiled step, from a child process (see `train/jax_step_child.py`)."""
    child_settings = {
        "interval": INTERVAL, "batch": settings["batch_size"],
        "block": settings["block_size"], "cycles": settings["cycles"],
        "warmup_cycles": settings["warmup_cycles"],
        "memory_runs": list(MEMORY_RUNS),
        "memory_fields": list(JAX_MEMORY_FIELDS),
        "parameter_size": size_of(settings["parameter_size"])}
    with tempfile.TemporaryDirectory() as out:
        out_file = os.path.join(out, "step")
        command = [sys.executable, "-m", "train.jax_step_child", out_file,
                   json.dumps(child_settings)]
        child = subprocess.run(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "KERAS_BACKEND": "jax"})
        if child.returncode != 0:
            raise RuntimeError(f"the JAX step child exited "
                               f"{child.returncode}:\n" + child.stderr[-2000:])
        with open(out_file) as f:
            measured = json.load(f)
    times = {name: cycle_times(seconds)
             for name, seconds in measured["times"].items()}
    return times, measured["memory"]


def jax_peak_bytes(analysis):
    """The device bytes a compiled train step needs at its peak, from
    XLA's buffer assignment (`memory_analysis()`).

    JAX's CPU backend keeps no device memory counters
    (`jax.devices()[0].memory_stats()` is None), and on a GPU they would
    be the process's peak over every model the child holds, never reset;
    what the step itself needs is in the program XLA compiled. While it
    runs the device holds its arguments (the state: weights, optimizer
    slots, metrics; and the batch), its outputs (the new state and the
    logs) and its temporaries: every intermediate (activations, logits,
    gradients, a refresh's estimator tensors) in one buffer XLA sizes to
    the most that is live at once over the schedule, both branches of
    the refresh `lax.cond` included. The donated state's outputs are
    written over its arguments (aliased), so they count once. Generated
    code is the program, not data, and is left out. This is the count
    XLA makes for a GPU too, where a GPU compiler's own fusions move it
    somewhat.
    """
    return (analysis["argument_size_in_bytes"]
            + analysis["output_size_in_bytes"]
            - analysis["alias_size_in_bytes"]
            + analysis["temp_size_in_bytes"])


PARTS = ("apply", "step", "memory", "hvp", "memory_second_size",
         "memory_parameters", "memory_arrays", "jax")
# Every part but `jax`, which needs the optional `jax` extra.
DEFAULT_PARTS = PARTS[:-1]


def run(mode, parts=DEFAULT_PARTS):
    """The measurements `parts` of `mode` ("full" or "quick"), as one
    dict."""
    settings = MODES[mode]
    start, start_cpu, began = os.getloadavg(), cpu_seconds(), time.time()
    print(f"load average at start: {start}", flush=True)
    result, seconds = {}, {}
    if "apply" in parts:
        parameters, seconds["apply"] = apply_times(
            settings["apply_model"], settings["apply_repeats"])
        print(f"apply on {parameters:,} parameters: {seconds['apply']}",
              flush=True)
        result["apply_time_ratio_vs_adamw"] = (
            seconds["apply"]["sophia"] / seconds["apply"]["adamw"])
        settings = {**settings, "apply_parameters": parameters}
    if "step" in parts:
        seconds["train_step"] = {}
        for jit in settings["jit_compile"]:
            label = LABELS[jit]
            seconds["train_step"][label] = step_times(settings, jit)
            print(f"train step ({label}): {seconds['train_step'][label]}",
                  flush=True)
        result.update(step_ratios(settings, seconds["train_step"]))
    if "memory" in parts:
        memory = {}
        for jit in settings["jit_compile"]:
            memory[LABELS[jit]] = peak_memory(settings, jit)
            print(f"peak memory ({LABELS[jit]}): {memory[LABELS[jit]]}",
                  flush=True)
        add_memory(result, memory)
    if "hvp" in parts:
        seconds["hvp"], peaks, result["hvp_products_checked"] = hvp_times(
            settings)
        print(f"Hessian-vector products: {seconds['hvp']}, peak bytes "
              f"{peaks}", flush=True)
        ways = ("reverse_over_reverse", "forward_over_reverse")
        result["hvp_time_in_gradients"] = {
            way: seconds["hvp"][way] / seconds["hvp"]["gradient"]
            for way in ways}
        result["hvp_peak_memory_in_gradients"] = {
            way: peaks[way] / peaks["gradient"] for way in ways}
        result["hvp_peak_bytes"] = peaks
    if "memory_second_size" in parts:
        # The same runs at a second size; its cells end in the model's
        # name (`sophia_g_xla_30m`).
        second = settings["second_size"]
        model = second["memory_flags"][
            second["memory_flags"].index("--model") + 1]
        memory = {}
        for jit in settings["jit_compile"]:
            label = f"{LABELS[jit]}_{model}"
            memory[label] = peak_memory(second, jit)
            print(f"peak memory ({label}): {memory[label]}", flush=True)
        add_memory(result, memory)
    # Where parameters dominate (cells `sophia_g_xla_parameters`), and
    # `fit` on arrays at the first size (`sophia_g_xla_arrays`).
    for part, key, arrays, cell in (
            ("memory_parameters", "parameter_size", False, "parameters"),
            ("memory_arrays", "arrays", True, "arrays")):
        if part not in parts:
            continue
        memory = {}
        for jit in settings["jit_compile"]:
            label = f"{LABELS[jit]}_{cell}"
            memory[label] = peak_memory(settings[key], jit, arrays)
            print(f"peak memory ({label}): {memory[label]}", flush=True)
        add_memory(result, memory)
    if "jax" in parts:
        seconds["jax_train_step"], analyses = jax_train_step(settings)
        print(f"train step (JAX): {seconds['jax_train_step']}", flush=True)
        print(f"memory analysis (JAX): {analyses}", flush=True)
        peaks = {jax_cell(name): jax_peak_bytes(analysis)
                 for name, analysis in analyses.items()}
        result["peak_memory_bytes"] = peaks
        # Beside the TensorFlow runs' ratios, if `memory` ran too; each
        # over AdamW's at its size.
        result.setdefault("peak_memory_ratio_vs_adamw", {}).update({
            cell: peak / peaks[jax_cell(jax_adamw(name))]
            for name, cell, peak in zip(analyses, peaks, peaks.values())
            if cell != jax_cell(jax_adamw(name))})
        result["jax_memory_analysis"] = analyses
        times = seconds["jax_train_step"]
        result["jax_step_time_ratio_vs_adamw"] = {
            name: times[name]["step"] / times["adamw"]["step"]
            for name in times if name.startswith("sophia_")}
        result["jax_ordinary_step_ratio_vs_keras_step"] = {
            name: times[name]["ordinary_step"]
            / times["keras_step_sophia"]["ordinary_step"]
            for name in times if name.startswith("sophia_")}
    result["state_bytes_per_param_bytes"] = state_bytes()
    result["seconds"] = seconds
    result["settings"] = {"mode": mode, "parts": list(parts),
                          "hessian_update_interval": INTERVAL, **settings}
    result["machine"] = machine()
    result["load"] = load(start, start_cpu, time.time() - began)
    print(f"load: {result['load']}", flush=True)
    return result


def step_ratios(settings, steps):
    """Each Sophia variant's step time over AdamW's, with the range of
    one cycle's ratio and the FLOP floor."""
    result = {}
    for estimator in ("g", "h"):
        ratios, ranges = {}, {}
        result[f"step_time_floor_sophia_{estimator}"] = {
            FRACTIONS[f].lstrip("_") or "full_batch": cycle_floor(
                estimator, f)
            for f in settings["fractions"]
        }
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
    return result


def parts_list(text):
    """The `--parts` value as a tuple, or an argparse error naming them."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"{text!r}: each part must be one of {', '.join(PARTS)}")
    return tuple(parts)


def main(argv=None):
    require_tensorflow("train.benchmark")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (minutes)")
    parser.add_argument("--out", default="benchmark.json",
                        help="the JSON file; the table goes next to it (.md)")
    parser.add_argument(
        "--parts", default=",".join(DEFAULT_PARTS), type=parts_list,
        help=f"comma-separated, any of {', '.join(PARTS)} (default: "
             f"{', '.join(DEFAULT_PARTS)}; jax needs the jax extra)")
    args = parser.parse_args(argv)
    result = run("quick" if args.quick else "full", args.parts)
    table = markdown(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
