"""The benchmark on Keras's JAX or torch backend, TensorFlow not needed:
the train steps of AdamW, Sophia-G, Sophia-H and Sophia through Keras's
own step timed in turn, and each step's peak device bytes.

    KERAS_BACKEND=jax python -m train.benchmark_backend OUT SETTINGS_JSON

`train.benchmark` runs it in its own process on those backends, and as a
child with `KERAS_BACKEND=jax` for its `jax` part (Keras picks its
backend once per process). Times go through `train_on_batch`, which
returns the loss as a number, so every step is waited for; the
optimizers take turns by cycle. Peak bytes: on JAX, XLA's buffer
assignment of the compiled step (`jax_peak_bytes` adds it
up); on torch with CUDA, `torch.cuda.max_memory_allocated` over a
refresh step and an ordinary step, reset per variant; on torch without a
GPU none (torch keeps no counters of CPU tensors). Writes to OUT, as
JSON, each optimizer's step times in order and each memory run's figures.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import keras
import keras_hub
import numpy as np

import keras_sophia
from models import gpt2
from train.benchmark_memory import MEMORY_RUNS
from train.benchmark_report import (INTERVAL, adamw_run, backend_cell,
                                    cycle_times, size_of)

# What the JAX step's memory runs read of `memory_analysis()`, in bytes.
JAX_MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes",
                     "alias_size_in_bytes", "temp_size_in_bytes",
                     "generated_code_size_in_bytes")


def optimizers(k):
    """Name -> a function making the optimizer; the Sophia ones refresh
    every `k` steps."""
    def sophia(**kwargs):
        return lambda: keras_sophia.Sophia(
            1e-4, weight_decay=0.1, hessian_update_interval=k, seed=0,
            **kwargs)

    return {
        "adamw": lambda: keras.optimizers.AdamW(1e-4, weight_decay=0.1),
        "sophia_g": sophia(),
        "sophia_h": sophia(estimator="hutchinson"),
        "keras_step_sophia": sophia(),
        # Not timed: only their memory is read.
        "sophia_g_half_batch": sophia(hessian_batch_fraction=0.5),
        "sophia_h_half_batch": sophia(estimator="hutchinson",
                                      hessian_batch_fraction=0.5),
    }


def build(optimizer, name, size, block):
    keras.utils.set_random_seed(0)
    model = gpt2.build(size, block_size=block)
    if name == "keras_step_sophia":
        # Keras's own train step, without SophiaTrainStep: h is never
        # refreshed (Sophia warns), so every step is Sophia's update alone.
        model = keras_hub.models.GPT2CausalLM(backbone=model.backbone,
                                              preprocessor=None)
    # XLA on JAX; torch runs eagerly (`torch.compile` is not tried with
    # the refresh yet, docs/not-done.md).
    model.compile(optimizer(),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=keras.backend.backend() == "jax")
    return model


def batch_of(rng, batch, block):
    tokens = rng.integers(0, gpt2.VOCAB_SIZE, size=(batch, block + 1))
    return ({"token_ids": tokens[:, :-1],
             "padding_mask": np.ones_like(tokens[:, :-1])}, tokens[:, 1:])


def step_times(models, batches, k, cycles, warmup_cycles):
    times = {name: [] for name in models}
    for cycle in range(warmup_cycles + cycles):
        for name, model in models.items():
            for i in range(k):
                start = time.perf_counter()
                logs = model.train_on_batch(*batches[i % len(batches)],
                                            return_dict=True)
                float(logs["loss"])
                if cycle >= warmup_cycles:
                    times[name].append(time.perf_counter() - start)
    return times


def has_memory_counters():
    """Whether `peak` can measure here: on JAX always (XLA's plan), on
    torch with CUDA only."""
    if keras.backend.backend() == "jax":
        return True
    import torch

    return torch.cuda.is_available()


def peak(model, batch, fields):
    """The peak device figures of `model`'s train step on `batch`, after
    one step that builds the optimizer and metrics: `fields` of JAX's
    `memory_analysis()` (`analyse`), or on torch with CUDA the
    allocator's `max_memory_allocated` over a refresh step and an
    ordinary step; None on torch without CUDA."""
    if keras.backend.backend() == "jax":
        return analyse(model, batch, fields)
    if not has_memory_counters():
        return None
    import torch

    model.train_on_batch(*batch)
    # The next step is a refresh step only every k steps: run to one.
    interval = getattr(model.optimizer, "hessian_update_interval", 1)
    while int(model.optimizer.iterations) % interval:
        model.train_on_batch(*batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        model.train_on_batch(*batch)
    torch.cuda.synchronize()
    return {"max_memory_allocated": torch.cuda.max_memory_allocated()}


def analyse(model, batch, fields):
    """`memory_analysis()` of the step `fit` runs: `model.train_step(state,
    data)` jitted with the state donated, as Keras's
    `make_train_function` does, on the state and batch `train_on_batch`
    passes it (one step first builds the optimizer and metrics). The
    refresh and the ordinary step are the two branches of one `lax.cond`
    in this one program. On CPU it is compiled without YNNPACK's library
    fusions, which would hold the intermediates of a fused chain of ops
    in YNNPACK's own memory, out of XLA's count; so every buffer of the
    step is one XLA assigns, as on a GPU."""
    import jax

    options = ({"xla_cpu_experimental_ynn_fusion_type": ""}
               if jax.default_backend() == "cpu" else None)
    model.train_on_batch(*batch)
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    data = jax.tree.map(jax.device_put, (*batch, None))
    analysis = jax.jit(model.train_step, donate_argnums=0).lower(
        state, data).compile(compiler_options=options).memory_analysis()
    return {field: getattr(analysis, field) for field in fields}


def measure(settings):
    """`{"times": {name: step seconds in order}, "memory": {run: peak
    figures or None}}` for `settings` (what `train.benchmark` passes)."""
    k, block = settings["interval"], settings["block"]
    made = optimizers(k)
    rng = np.random.default_rng(0)
    batches = [batch_of(rng, settings["batch"], block) for _ in range(8)]
    models = {name: build(made[name], name, "tiny", block) for name in
              ("adamw", "sophia_g", "sophia_h", "keras_step_sophia")}
    times = step_times(models, batches, k, settings["cycles"],
                       settings["warmup_cycles"])
    fields = settings["memory_fields"]
    memory = {}
    if not has_memory_counters():
        return {"times": times,
                "memory": {name: None for name in settings["memory_runs"]}}
    for name in settings["memory_runs"]:
        model = (models[name] if name in models
                 else build(made[name], name, "tiny", block))
        memory[name] = peak(model, batches[0], fields)
    # Where parameters dominate: the same runs at `parameter_size`, under
    # names ending in `_parameters`.
    size = settings["parameter_size"]
    if size:
        big = batch_of(rng, size["batch"], size["block"])
        for name in settings["memory_runs"]:
            memory[f"{name}_parameters"] = peak(
                build(made[name], name, size["model"], size["block"]), big,
                fields)
    return {"times": times, "memory": memory}


def train_steps(settings, backend):
    """`(times, memory)` of `measure` on Keras's `backend` for
    `train.benchmark`'s `settings`: in this process where Keras runs on
    it, else in a child process with `KERAS_BACKEND` set; each
    optimizer's times summed up by `cycle_times`."""
    child_settings = {
        "interval": INTERVAL, "batch": settings["batch_size"],
        "block": settings["block_size"], "cycles": settings["cycles"],
        "warmup_cycles": settings["warmup_cycles"],
        "memory_runs": list(MEMORY_RUNS),
        "memory_fields": list(JAX_MEMORY_FIELDS),
        "parameter_size": size_of(settings["parameter_size"])}
    if keras.backend.backend() == backend:
        measured = measure(child_settings)
    else:
        measured = _in_child(child_settings, backend)
    times = {name: cycle_times(seconds)
             for name, seconds in measured["times"].items()}
    return times, measured["memory"]


def _in_child(settings, backend):
    with tempfile.TemporaryDirectory() as out:
        out_file = os.path.join(out, "step")
        command = [sys.executable, "-m", "train.benchmark_backend", out_file,
                   json.dumps(settings)]
        child = subprocess.run(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "KERAS_BACKEND": backend})
        if child.returncode != 0:
            raise RuntimeError(f"the {backend} step child exited "
                               f"{child.returncode}:\n" + child.stderr[-2000:])
        with open(out_file) as f:
            return json.load(f)


def add_backend(result, seconds, settings, backend):
    """Measures the train steps on Keras's `backend` and puts what
    `train.benchmark` reports of them into `result` and `seconds`: step
    times, their ratios, tokens per second, and the peak bytes of every
    memory run that has them (cells `sophia_g_jax`,
    `sophia_g_torch_parameters`, ...), each over AdamW's at its size."""
    times, memory = train_steps(settings, backend)
    seconds[f"{backend}_train_step"] = times
    result[f"{backend}_step_time_ratio_vs_adamw"] = {
        name: times[name]["step"] / times["adamw"]["step"]
        for name in times if name.startswith("sophia_")}
    result[f"{backend}_ordinary_step_ratio_vs_keras_step"] = {
        name: times[name]["ordinary_step"]
        / times["keras_step_sophia"]["ordinary_step"]
        for name in times if name.startswith("sophia_")}
    tokens = settings["batch_size"] * settings["block_size"]
    result[f"{backend}_tokens_per_second"] = {
        name: tokens / t["step"] for name, t in times.items()}
    result[f"{backend}_memory_analysis"] = memory
    peaks = {backend_cell(name, backend): peak_bytes(figures)
             for name, figures in memory.items() if figures is not None}
    if not peaks:
        return
    result.setdefault("peak_memory_bytes", {}).update(peaks)
    result.setdefault("peak_memory_ratio_vs_adamw", {}).update({
        backend_cell(name, backend):
            peaks[backend_cell(name, backend)]
            / peaks[backend_cell(adamw_run(name), backend)]
        for name, figures in memory.items()
        if figures is not None and adamw_run(name) != name})


def peak_bytes(figures):
    """The peak device bytes of one memory run's figures (`peak`)."""
    if "max_memory_allocated" in figures:
        return figures["max_memory_allocated"]
    return jax_peak_bytes(figures)


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


def main(out, settings):
    with open(out, "w") as f:
        json.dump(measure(settings), f)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
