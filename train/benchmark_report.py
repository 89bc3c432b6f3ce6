"""The tables of `train.benchmark`'s results: what its JSON holds, as
markdown. Pure functions of the result dict, so `train.figures` can
regenerate every committed table from `benchmarks/*.json`.

Ratios are Sophia's over AdamW's; below 1 Sophia is cheaper.
"""

import statistics

import numpy as np

INTERVAL = 10  # k: one Hessian refresh per cycle of 10 steps
# Share of the batch the Hessian is estimated on: all of it, the paper's
# half (240 of 480), and a quarter; and how results name them.
FRACTIONS = {1.0: "", 0.5: "_half_batch", 0.25: "_quarter_batch"}
LABELS = {False: "graph", True: "xla"}
# Targets of the XLA step ratios (the issue's, at k = 10), per estimator
# and Hessian share; memory: within 10% of AdamW's in both modes.
TARGETS = {("g", 1.0): 1.08, ("g", 0.5): 1.04,
           ("h", 1.0): 1.20, ("h", 0.5): 1.10}
MEMORY_TARGET = 1.10
# Keras's other backends the benchmark measures, and how their steps run.
BACKENDS = {"jax": "JAX (XLA)", "torch": "torch (eager)"}


def floor(estimator, fraction, shared=False):
    """A refresh step's cost in AdamW steps if it paid only for its FLOPs.

    A step is a forward pass (1) and a backward pass (2). In chunks (the
    default, `hessian_chunks="auto"`, which every run here uses) the
    estimator runs a forward pass of its own over the Hessian's share f
    of the batch: GNB adds it and one backward pass through the
    sampled-label loss, 1 + f; Hutchinson adds it, the backward pass its
    product differentiates, and the Hessian-vector product, about two
    gradient evaluations (Pearlmutter 1994): 1 + 3f. Sharing the training
    pass (`shared`: one chunk, whole batch), GNB adds only its backward
    pass, 1 + 2f/3, and Hutchinson only the product, 1 + 2f.
    """
    if estimator == "g":
        extra = 2 * fraction / 3 if shared else fraction
    else:
        extra = 2 * fraction if shared else 3 * fraction
    return 1 + extra


def cycle_floor(estimator, fraction, shared=False):
    """The floor of a whole k-step cycle, per step, over AdamW's."""
    return 1 + (floor(estimator, fraction, shared) - 1) / INTERVAL


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


def backend_cell(name, backend):
    """The cell of a memory run on Keras's JAX or torch backend:
    `sophia_g_jax`, or `sophia_g_jax_parameters` where parameters
    dominate."""
    base, found, _ = name.partition("_parameters")
    return f"{base}_{backend}" + found


def adamw_run(name):
    """The AdamW run a memory run is compared with (same size)."""
    return "adamw_parameters" if name.endswith("_parameters") else "adamw"


def markdown(result):
    """The result as markdown tables (ratios < 1: Sophia is cheaper)."""
    settings = result["settings"]
    busy = "BUSY machine: " if result["load"]["busy"] else ""
    rows = [
        f"{busy}{load_line(result['load'])}",
        "",
        ("| measure | Sophia / AdamW | one cycle's ratio, min-max | "
         "FLOP floor | target |"),
        "|---|---|---|---|---|",
    ]
    if "apply_time_ratio_vs_adamw" in result:
        rows.append(
            f"| apply, {settings['apply_parameters']:,} parameters (XLA) | "
            f"{result['apply_time_ratio_vs_adamw']:.3f} | | | <= 0.85 |")
    names = {"": "full", "_half_batch": "half", "_quarter_batch": "quarter"}
    for label in map(LABELS.get, settings["jit_compile"]):
        for estimator in ("g", "h"):
            ratios = result.get(
                f"step_time_ratio_sophia_{estimator}_vs_adamw", {})
            ranges = result.get(
                f"step_time_ratio_range_sophia_{estimator}_vs_adamw", {})
            for fraction in settings["fractions"]:
                suffix = FRACTIONS[fraction]
                if label + suffix not in ratios:
                    continue
                target = TARGETS.get((estimator, fraction))
                target = f"<= {target}" if target and label == "xla" else ""
                low, high = ranges[label + suffix]
                rows.append(
                    f"| train step, Sophia-{estimator.upper()}, {label}, "
                    f"Hessian on the {names[suffix]} batch | "
                    f"{ratios[label + suffix]:.3f} | {low:.2f}-{high:.2f} | "
                    f"{cycle_floor(estimator, fraction):.3f} | {target} |"
                )
    for backend, mode in BACKENDS.items():
        for name, ratio in result.get(f"{backend}_step_time_ratio_vs_adamw",
                                      {}).items():
            estimator = name[len("sophia_")]
            rows.append(
                f"| train step, Sophia-{estimator.upper()}, Keras on "
                f"{mode}, Hessian on the full batch | {ratio:.3f} | | "
                f"{cycle_floor(estimator, 1.0):.3f} | |")
        for name, ratio in result.get(
                f"{backend}_ordinary_step_ratio_vs_keras_step", {}).items():
            rows.append(
                f"| ordinary step, Sophia-{name[len('sophia_')].upper()}, "
                f"Keras on {mode}, over Sophia through Keras's own step | "
                f"{ratio:.3f} | | 1.000 | |")
        memory = result.get(f"{backend}_memory_analysis", {})
        if memory and all(figures is None for figures in memory.values()):
            rows.append(f"| peak device memory, Keras on {mode} | not "
                        "measured: torch keeps no counters of CPU tensors "
                        "| | | |")
    for key, ratio in result.get("peak_memory_ratio_vs_adamw", {}).items():
        rows.append(f"| peak device memory, {key} | {ratio:.2f} | | | "
                    f"<= {MEMORY_TARGET} |")
    state = result.get("state_bytes_per_param_bytes")
    if state:
        rows.append(
            "| state bytes per parameter byte (Sophia, AdamW, Lion) | "
            f"{state['sophia']:.2f}, {state['adamw']:.2f}, "
            f"{state['lion']:.2f} | | | Sophia = AdamW |")
    sections = [rows]
    if {"train_step", "jax_train_step", "torch_train_step"} & set(
            result["seconds"]):
        sections.append([profile(result)])
    if "memory_bytes" in result:
        sections.append([memory_table(result)])
    if "jax_memory_analysis" in result:
        sections.append([jax_memory_table(result)])
    if "hvp_time_in_gradients" in result:
        sections.append([hvp_table(result)])
    return "\n\n".join("\n".join(rows) for rows in sections) + "\n"


def hvp_table(result):
    """The two ways of making a Hessian-vector product, in gradients."""
    seconds = result["seconds"]["hvp"]
    peaks = result["hvp_peak_bytes"]
    rows = [
        "| XLA, tiny GPT-2 | ms | x the training gradient | peak device "
        "GB | x the training gradient's |",
        "|---|---|---|---|---|",
        f"| training gradient | {1e3 * seconds['gradient']:.0f} | 1.00 | "
        f"{peaks['gradient'] / 1e9:.2f} | 1.00 |",
    ]
    for way, ratio in result["hvp_time_in_gradients"].items():
        rows.append(
            f"| gradient and H v, {way.replace('_', ' ')} | "
            f"{1e3 * seconds[way]:.0f} | {ratio:.2f} | "
            f"{peaks[way] / 1e9:.2f} | "
            f"{result['hvp_peak_memory_in_gradients'][way]:.2f} |")
    checked = result.get("hvp_products_checked")
    rows.append("" if checked is None else (
        f"\nBefore timing, both ways made a product for each of the "
        f"{checked['variables']} variables, equal to within "
        f"{checked['largest_difference']:.1e} of the largest entry."))
    return "\n".join(rows)


def load_line(load):
    start = ", ".join(f"{x:.2f}" for x in load["load_average_start"])
    end = ", ".join(f"{x:.2f}" for x in load["load_average_end"])
    share = load["other_processes_cpu_share"]
    share = "unknown" if share is None else f"{100 * share:.1f}%"
    return (f"Load average (1, 5, 15 min) at start {start}, at end {end}; "
            f"other processes used {share} of the CPUs during the run.")


def profile(result):
    """Where the step time goes: ordinary and refresh steps apart, in
    milliseconds and in AdamW steps, the refresh next to its floor."""
    rows = [
        ("| optimizer | mode | ordinary step, ms (x AdamW) | refresh step, "
         "ms (x AdamW) | refresh floor (x AdamW) |"),
        "|---|---|---|---|---|",
    ]
    fractions = {suffix: f for f, suffix in FRACTIONS.items()}
    runs = dict(result["seconds"].get("train_step", {}))
    for backend in BACKENDS:
        if f"{backend}_train_step" in result["seconds"]:
            runs[backend] = result["seconds"][f"{backend}_train_step"]
    for label, times in runs.items():
        base = times["adamw"]["step"]
        for name, t in times.items():
            floor_text = ""
            if name.startswith("sophia_"):
                estimator = name[len("sophia_")]
                suffix = name[len("sophia_g"):]
                floor_text = f"{floor(estimator, fractions[suffix]):.2f}"
            rows.append(
                f"| {name} | {label} | {1e3 * t['ordinary_step']:.0f} "
                f"({t['ordinary_step'] / base:.2f}) | "
                f"{1e3 * t['refresh_step']:.0f} "
                f"({t['refresh_step'] / base:.2f}) | {floor_text} |"
            )
    return "\n".join(rows)


def memory_table(result):
    """Peak memory of each short training run, in GB."""
    settings = result["settings"]
    rows = [
        "| optimizer | mode | `train.pretrain`: device peak, GB (x AdamW) "
        "| process peak RSS, GB (x AdamW) |",
        "|---|---|---|---|",
    ]
    for label, runs in result["memory_bytes"].items():
        cells = [
            " | ".join(f"{run[kind] / 1e9:.2f} "
                       f"({run[kind] / runs['adamw'][kind]:.2f})"
                       for kind in ("device", "process"))
            for run in runs.values()]
        rows += [f"| {name} | {label} | {cell} |"
                 for name, cell in zip(runs, cells)]
    sizes = [f"{settings['memory_steps']} steps with "
             f"{' '.join(settings['memory_flags']) or '(defaults)'}"]
    for key, label in (("second_size", "the second size (`_30m`, `_tiny`)"),
                       ("parameter_size", "`_parameters`")):
        if key in settings:
            size = settings[key]
            sizes.append(f"{label} {size['memory_steps']} steps with "
                         f"{' '.join(size['memory_flags'])}")
    if "arrays" in settings:
        sizes.append("`_arrays`: `fit` on arrays of 2.5 batches of "
                     f"{' '.join(settings['arrays']['memory_flags'])} "
                     "(`train.fit_memory`)")
    return "\n".join(rows) + "\n\nRuns of " + "; ".join(sizes) + "."


def jax_memory_table(result):
    """The JAX train step's peak device bytes and their parts, in GB."""
    rows = [
        "| Keras on JAX: XLA's buffers of one step | arguments (state, "
        "batch), GB | outputs not written in place, GB | temporaries, GB | "
        "peak, GB (x AdamW) |",
        "|---|---|---|---|---|",
    ]
    peaks = result["peak_memory_bytes"]
    for name, analysis in result["jax_memory_analysis"].items():
        peak = peaks[backend_cell(name, "jax")]
        adamw = peaks[backend_cell(adamw_run(name), "jax")]
        written = (analysis["output_size_in_bytes"]
                   - analysis["alias_size_in_bytes"])
        rows.append(
            f"| {name} | {analysis['argument_size_in_bytes'] / 1e9:.3f} | "
            f"{written / 1e9:.3f} | {analysis['temp_size_in_bytes'] / 1e9:.3f}"
            f" | {peak / 1e9:.3f} ({peak / adamw:.2f}) |")
    return "\n".join(rows)


def size_of(size):
    """{"model", "batch", "block"} of a size's `train.pretrain` flags."""
    flags = size["memory_flags"]
    return {"model": flags[flags.index("--model") + 1],
            "batch": int(flags[flags.index("--batch-size") + 1]),
            "block": int(flags[flags.index("--block-size") + 1])}


# The memory cells: the suffix of their keys, what dominates there.
REGIMES = {"": "activations", "_parameters": "parameters",
           "_arrays": "`fit` on arrays: batch size unknown when traced"}
# The columns of `memory_cells`: the mode in a cell's key, the heading.
COLUMNS = {"xla": "TF XLA", "graph": "TF graph", "jax": "JAX"}
# Cells a column cannot have, and why.
SAME_AS = {("_arrays", "jax"): "the static batch's (JAX traces shapes)"}


def _spread(values):
    low, high = min(values), max(values)
    return f"{low:.2f}" if f"{low:.2f}" == f"{high:.2f}" else (
        f"{low:.2f}-{high:.2f}")


def _verdict(met):
    """'yes', 'no', or per mode, from {mode: whether it met the target}."""
    if not met:
        return ""
    if all(met.values()) or not any(met.values()):
        return "yes" if all(met.values()) else "no"
    return ", ".join(f"{mode} {'yes' if ok else 'no'}"
                     for mode, ok in met.items())


def memory_cells(result):
    """Peak device memory over AdamW's per cell (size) and mode, every
    Sophia variant (G, H; whole and half Hessian batch), and which modes
    meet MEMORY_TARGET."""
    settings = result["settings"]
    second = size_of(settings["second_size"])
    parameters = size_of(settings["parameter_size"])
    arrays = size_of({"memory_flags": ["--model", "tiny"]
                      + settings["arrays"]["memory_flags"]})
    sizes = {f"_{size['model']}" if name == "second" else name:
             f"{size['model']}, {size['batch']} x {size['block']}"
             for name, size in (
                 ("", {"model": "tiny", "batch": settings["batch_size"],
                       "block": settings["block_size"]}),
                 ("second", second), ("_parameters", parameters),
                 ("_arrays", arrays))}
    ratios = result["peak_memory_ratio_vs_adamw"]
    rows = ["| cell | " + " | ".join(COLUMNS.values()) + " | <= "
            f"{MEMORY_TARGET} |", "|---" * (len(COLUMNS) + 2) + "|"]
    for suffix, size in sizes.items():
        texts, met = [], {}
        for mode, column in COLUMNS.items():
            found = {e: [ratios[key] for f in ("", "_half_batch")
                         if (key := f"sophia_{e}{f}_{mode}{suffix}")
                         in ratios] for e in ("g", "h")}
            values = found["g"] + found["h"]
            if not values:
                texts.append(SAME_AS.get((suffix, mode), "not measured"))
                continue
            met[column] = max(values) <= MEMORY_TARGET
            one = _spread(values) == f"{values[0]:.2f}"
            texts.append(_spread(values) if one else
                         f"G {_spread(found['g'])}, H {_spread(found['h'])}")
        regime = REGIMES.get(suffix, "activations")
        rows.append(f"| {size} ({regime}) | " + " | ".join(texts)
                    + f" | {_verdict(met)} |")
    return "\n".join(rows)


def step_table(result):
    """Step time over AdamW's per mode, estimator and Hessian share, with
    one cycle's range, the FLOP floor and the target."""
    rows = ["| train step, k = 10 | Sophia / AdamW | one cycle's ratio, "
            "min-max | floor | target | |", "|---|---|---|---|---|---|"]
    names = {"": "whole", "_half_batch": "half", "_quarter_batch": "quarter"}
    for estimator in ("g", "h"):
        ratios = result.get(f"step_time_ratio_sophia_{estimator}_vs_adamw", {})
        ranges = result.get(
            f"step_time_ratio_range_sophia_{estimator}_vs_adamw", {})
        for key, ratio in ratios.items():
            label, _, share = key.partition("_")
            fraction = {v: k for k, v in FRACTIONS.items()}[
                "_" + share if share else ""]
            target = TARGETS.get((estimator, fraction)) if (
                label == "xla") else None
            low, high = ranges[key]
            verdict = "" if target is None else (
                "met" if ratio <= target else "missed")
            rows.append(
                f"| Sophia-{estimator.upper()}, TF {label}, Hessian on the "
                f"{names['_' + share if share else '']} batch | {ratio:.3f} |"
                f" {low:.2f}-{high:.2f} | {cycle_floor(estimator, fraction):.3f}"
                f" | {'' if target is None else f'<= {target}'} | {verdict} |")
        for backend, mode in BACKENDS.items():
            ratios = result.get(f"{backend}_step_time_ratio_vs_adamw", {})
            if f"sophia_{estimator}" in ratios:
                rows.append(
                    f"| Sophia-{estimator.upper()}, {mode}, Hessian on the "
                    f"whole batch | {ratios[f'sophia_{estimator}']:.3f} | | "
                    f"{cycle_floor(estimator, 1.0):.3f} | | |")
    return "\n".join(rows)


def headline(result):
    """README's summary: Sophia-G and Sophia-H over AdamW, per step and at
    a step's peak, where activations and where parameters dominate."""
    ratios = result["peak_memory_ratio_vs_adamw"]
    settings = result["settings"]
    second = f"_{size_of(settings['second_size'])['model']}"
    parameters = size_of(settings["parameter_size"])
    rows = ["| over AdamW's | Sophia-G | Sophia-H |", "|---|---|---|"]
    for fraction, share in ((1.0, "whole"), (0.5, "half")):
        key = "xla" + FRACTIONS[fraction]
        steps = [result[f"step_time_ratio_sophia_{e}_vs_adamw"][key]
                 for e in ("g", "h")]
        rows.append(
            f"| train step, TF XLA, Hessian on the {share} batch (tiny "
            f"GPT-2, {settings['batch_size']} x {settings['block_size']}, "
            f"k = 10) | {steps[0]:.2f} | {steps[1]:.2f} |")

    def peak(estimator, modes, suffixes):
        return max(value for key, value in ratios.items()
                   if key.startswith(f"sophia_{estimator}_")
                   and any(key.endswith(f"_{mode}{suffix}") for mode in modes
                           for suffix in suffixes))

    activations = [peak(e, ("xla", "jax"), ("", second, "_arrays"))
                   for e in ("g", "h")]
    rows.append("| peak device memory where activations dominate (tiny, "
                f"{second[1:]}, `fit` on arrays; TF XLA, JAX), largest | "
                f"{activations[0]:.2f} | {activations[1]:.2f} |")
    for mode, name in (("xla", "TF XLA"), ("jax", "JAX")):
        rows.append(
            f"| peak device memory where parameters dominate "
            f"({parameters['model']}, {parameters['batch']} x "
            f"{parameters['block']}), {name} | " + " | ".join(
                f"{peak(e, (mode,), ('_parameters',)):.2f}"
                for e in ("g", "h")) + " |")
    state = result["state_bytes_per_param_bytes"]
    rows.append("| optimizer state, bytes per parameter byte (AdamW "
                f"{state['adamw']:.2f}) | {state['sophia']:.2f} | "
                f"{state['sophia']:.2f} |")
    if "apply_time_ratio_vs_adamw" in result:
        apply = f"{result['apply_time_ratio_vs_adamw']:.2f}"
        rows.append("| the update alone (`apply`, GPT-2 small's "
                    f"variables, XLA) | {apply} | {apply} |")
    return "\n".join(rows)
