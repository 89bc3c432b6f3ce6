"""The JAX part of `train.benchmark`, in a process of its own with
`KERAS_BACKEND=jax` (Keras picks its backend once per process, and the
benchmark is a TensorFlow program):

    KERAS_BACKEND=jax python -m train.jax_step_child OUT SETTINGS_JSON

Times the train steps of AdamW, Sophia-G, Sophia-H and Sophia through
Keras's own step (`train_on_batch`, which returns the loss as a number,
so every step is waited for; the optimizers take turns by cycle, as in
`benchmark.step_times`), then reads XLA's buffer assignment of the train
step of AdamW and of each Sophia variant the settings name
(`benchmark.jax_peak_bytes` adds it up). Writes to OUT, as JSON, each
optimizer's step times in order and each memory run's
`memory_analysis()` fields.
"""

import json
import sys
import time

import jax
import keras
import keras_hub
import numpy as np

import keras_sophia
from models import gpt2


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
    model.compile(optimizer(),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
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


def main(out, settings):
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
    for name in settings["memory_runs"]:
        model = (models[name] if name in models
                 else build(made[name], name, "tiny", block))
        memory[name] = analyse(model, batches[0], fields)
    # Where parameters dominate: the same runs at `parameter_size`, under
    # names ending in `_parameters`.
    size = settings["parameter_size"]
    if size:
        big = batch_of(rng, size["batch"], size["block"])
        for name in settings["memory_runs"]:
            memory[f"{name}_parameters"] = analyse(
                build(made[name], name, size["model"], size["block"]), big,
                fields)
    with open(out, "w") as f:
        json.dump({"times": times, "memory": memory}, f)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
