"""What Sophia's update and train step cost in time next to AdamW's, for
`train.benchmark`: the optimizers it compares, medians of turns taken in
one process, and the state each keeps."""

import statistics
import time

import keras
import numpy as np
import tensorflow as tf

import keras_sophia
from models import gpt2
from train.benchmark_report import (FRACTIONS, INTERVAL, cycle_floor,
                                    cycle_times)


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
