"""What Sophia costs next to AdamW: the update, the train step, the state.

    python -m train.benchmark                  # the numbers in BENCHMARKS.md
    python -m train.benchmark --quick          # a few minutes (smoke test)
    python -m train.benchmark --out FILE.json  # default: benchmark.json
    python -m train.benchmark --parts step,hvp # only some measurements
    python -m train.benchmark --parts jax      # Keras on JAX (jax extra)
    KERAS_BACKEND=torch python -m train.benchmark   # on torch, no TensorFlow

On Keras's TensorFlow backend it measures TensorFlow (and, asked for,
the `jax` and `torch` parts, each in a child process on that backend);
on JAX or torch only that backend, and TensorFlow need not be installed.
Each part's measurement lives in a module of its own: `benchmark_step`
(the update and the train step), `benchmark_memory`, `benchmark_hvp`,
`benchmark_backend` (JAX and torch); `benchmark_report` makes the
tables. This one runs the parts and writes their results.

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
  its extra FLOPs (see `benchmark_report.floor`), next to which the
  measured one is read.
* `peak_memory_ratio_vs_adamw`: the peak bytes the device (TensorFlow's
  CPU allocator) held during a short `train.pretrain` run of each Sophia
  variant over AdamW's, each in a fresh process
  (`train/peak_memory_child.py`);
  `process_memory_ratio_vs_adamw`: the same for the process's peak RSS.
  Its `*_jax` cells (`--parts jax`) are the same over the train step
  compiled by Keras's JAX backend, from XLA's buffer assignment (see
  `benchmark_backend.jax_peak_bytes`), and its `*_torch` cells over
  torch's `max_memory_allocated` on a CUDA device (none without one);
  their bytes are `peak_memory_bytes`.
* `hvp_time_in_gradients`: a training gradient with one Hessian-vector
  product (Sophia-H's refresh), in training gradients, made reverse over
  reverse (what `EstimatorContext.hvp` does) and forward over reverse.
* `state_bytes_per_param_bytes`: optimizer state per byte of parameters.
* `{jax,torch}_step_time_ratio_vs_adamw`: the same step ratio on Keras's
  JAX backend (XLA) or torch backend (eager), Sophia-G and Sophia-H on
  the whole batch (`--parts jax` / `torch`; they need their extras);
  `{jax,torch}_ordinary_step_ratio_vs_keras_step`: their ordinary steps
  over Sophia's step through Keras's own train step (the update alone,
  no refresh), which tells `SophiaTrainStep`'s cost from the update's;
  `{jax,torch}_tokens_per_second`: each optimizer's tokens over its
  step time (on a CPU a figure of this machine only).
* `load`: the load average at start and end, and the share of the CPUs
  other processes used during the run; `busy` flags a run whose timings
  load could have moved.
"""

import argparse
import json
import os
import platform
import resource
import time
from importlib import metadata

import keras

from train.benchmark_backend import add_backend
from train.benchmark_memory import add_memory, peak_memory
from train.benchmark_report import INTERVAL, LABELS, markdown

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


# Other processes using more than this share of the CPUs during the run
# (or, where that is unknown, a 1-minute load average above this many
# runnable threads per CPU at the start) mark the run busy.
BUSY_SHARE = 0.05


BUSY_LOAD_PER_CPU = 0.25


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
        "backend": keras.backend.backend(),
        **versions(),
    }


def versions():
    """The installed versions of Keras and its backends."""
    found = {}
    for package in ("keras", "tensorflow", "jax", "torch"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


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


# The parts that measure Keras's TensorFlow backend (TensorFlow's tapes
# and allocator, train.pretrain's runs), and those that measure Keras's
# JAX or torch backend (in a process of their own where Keras runs on
# another).
TENSORFLOW_PARTS = ("apply", "step", "memory", "hvp", "memory_second_size",
                    "memory_parameters", "memory_arrays")
BACKEND_PARTS = ("jax", "torch")
PARTS = TENSORFLOW_PARTS + BACKEND_PARTS
# Per Keras backend: on TensorFlow every part of its own (the others need
# optional extras); elsewhere, that backend's.
DEFAULT_PARTS = {"tensorflow": TENSORFLOW_PARTS, "jax": ("jax",),
                 "torch": ("torch",)}


def run(mode, parts):
    """The measurements `parts` of `mode` ("full" or "quick"), as one
    dict."""
    settings = MODES[mode]
    if set(parts) & set(TENSORFLOW_PARTS):
        # Their modules import TensorFlow, which the other backends do
        # without.
        from train.benchmark_hvp import hvp_times
        from train.benchmark_step import (apply_times, state_bytes,
                                          step_ratios, step_times)
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
    for backend in BACKEND_PARTS:
        if backend in parts:
            # Beside the TensorFlow runs' figures, if those parts ran too.
            add_backend(result, seconds, settings, backend)
            print(f"train step ({backend}): "
                  f"{seconds[backend + '_train_step']}", flush=True)
            print(f"memory ({backend}): "
                  f"{result[backend + '_memory_analysis']}", flush=True)
    if set(parts) & set(TENSORFLOW_PARTS):
        result["state_bytes_per_param_bytes"] = state_bytes()
    result["seconds"] = seconds
    result["settings"] = {"mode": mode, "parts": list(parts),
                          "hessian_update_interval": INTERVAL, **settings}
    result["machine"] = machine()
    result["load"] = load(start, start_cpu, time.time() - began)
    print(f"load: {result['load']}", flush=True)
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
    backend = keras.backend.backend()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (minutes)")
    parser.add_argument("--out", default="benchmark.json",
                        help="the JSON file; the table goes next to it (.md)")
    parser.add_argument(
        "--parts", default=",".join(DEFAULT_PARTS[backend]), type=parts_list,
        help=f"comma-separated, any of {', '.join(PARTS)} (default on "
             f"Keras's {backend} backend: "
             f"{', '.join(DEFAULT_PARTS[backend])}; jax and torch need "
             "their extras)")
    args = parser.parse_args(argv)
    refused = [p for p in args.parts if p in TENSORFLOW_PARTS]
    if backend != "tensorflow" and refused:
        parser.error(
            f"--parts {','.join(refused)} needs Keras's TensorFlow backend; "
            f"KERAS_BACKEND is {backend!r}, where the parts are "
            f"{', '.join(BACKEND_PARTS)}")
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
