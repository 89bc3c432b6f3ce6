"""Peak memory of each optimizer's short training run, for
`train.benchmark` (`--parts memory*`): every run in a fresh process
(`train/peak_memory_child.py`, or `train/fit_memory.py` for `fit` on
arrays), whose peaks it reports."""

import json
import os
import subprocess
import sys
import tempfile


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
