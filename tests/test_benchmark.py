"""train.benchmark: the state-size figure, and the program in --quick mode.

The speed targets are benchmark results (BENCHMARKS.md), not assertions:
timings on a shared 2-core machine would make such tests flaky."""

import json
import math

import numpy as np
import pytest

from train import benchmark, benchmark_hvp, benchmark_memory, benchmark_step


def test_sophia_keeps_as_much_state_as_adamw_and_twice_lion():
    # Sophia: m and h; AdamW: m and v; Lion: m. One float32 each per weight.
    assert benchmark_step.state_bytes() == {"sophia": 2.0, "adamw": 2.0,
                                            "lion": 1.0}


@pytest.mark.large
def test_quick_mode_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert math.isfinite(result["apply_time_ratio_vs_adamw"])
    assert result["apply_time_ratio_vs_adamw"] > 0
    for estimator in ("g", "h"):
        ratios = result[f"step_time_ratio_sophia_{estimator}_vs_adamw"]
        assert set(ratios) == {"graph", "graph_half_batch"}
        assert all(math.isfinite(r) and r > 0 for r in ratios.values())
        # A ratio of medians lies within the range of the paired ratios:
        # if every cycle has S_i >= lo * A_i, the medians do too.
        ranges = result[f"step_time_ratio_range_sophia_{estimator}_vs_adamw"]
        assert set(ranges) == set(ratios)
        for key, (lo, hi) in ranges.items():
            assert 0 < lo <= ratios[key] <= hi, key
    assert result["state_bytes_per_param_bytes"]["sophia"] == 2.0
    # Each variant's peak device bytes and RSS, over AdamW's from its own
    # fresh process; the device's tensors are part of the process.
    runs = result["memory_bytes"]["graph"]
    assert set(runs) == set(benchmark_memory.MEMORY_RUNS)
    for run in runs.values():
        assert 0 < run["device"] < run["process"]
        assert run["process"] > 100e6
        # In graph mode each variant ran twice; its peak is the larger.
        assert len(run["runs"]) == 2
        assert run["device"] == max(r["device"] for r in run["runs"])
    g, adamw = runs["sophia_g"], runs["adamw"]
    assert result["peak_memory_ratio_vs_adamw"]["sophia_g_graph"] == (
        g["device"] / adamw["device"])
    assert result["process_memory_ratio_vs_adamw"]["sophia_g_graph"] == (
        g["process"] / adamw["process"])
    # The same runs at the second size, under their own labels.
    second = result["memory_bytes"]["graph_tiny"]
    assert set(second) == set(benchmark_memory.MEMORY_RUNS)
    assert result["peak_memory_ratio_vs_adamw"]["sophia_h_graph_tiny"] == (
        second["sophia_h"]["device"] / second["adamw"]["device"])
    # 8 x 64 tokens against 2 x 16: 16 times the logits. One copy of them,
    # 0.1 GB, is four times the largest swing of a graph-mode peak seen
    # between two runs of one variant (0.025 GB, in CI).
    assert second["adamw"]["device"] > adamw["device"]
    # Where parameters dominate, and `fit` on arrays: every variant, each
    # over AdamW's at its size.
    for label in ("graph_parameters", "graph_arrays"):
        runs = result["memory_bytes"][label]
        assert set(runs) == set(benchmark_memory.MEMORY_RUNS)
        assert all(0 < run["device"] < run["process"]
                   for run in runs.values())
        assert result["peak_memory_ratio_vs_adamw"][
            f"sophia_h_half_batch_{label}"] == (
            runs["sophia_h_half_batch"]["device"] / runs["adamw"]["device"])
    # Both ways made every product, and the same ones, before they were
    # timed (a timing ratio is a result, not an assertion).
    assert result["hvp_products_checked"]["variables"] == 36
    assert result["hvp_products_checked"]["largest_difference"] <= 1e-3
    for way, ratio in result["hvp_time_in_gradients"].items():
        assert ratio > 0, way
        # A product holds more than the gradient alone.
        assert result["hvp_peak_memory_in_gradients"][way] > 1.0, way
    load = result["load"]
    assert len(load["load_average_start"]) == 3
    assert isinstance(load["busy"], bool)
    table = (tmp_path / "bench.md").read_text()
    assert "| apply, 6,960,768 parameters (XLA) |" in table
    assert "refresh step" in table
    assert "| sophia_h | graph_tiny |" in table


def test_a_missing_or_different_product_fails_the_benchmark():
    reverse = [np.ones((2, 3)), np.full(4, 2.0)]
    same = [r.copy() for r in reverse]
    assert benchmark_hvp.check_products(reverse, same) == {
        "variables": 2, "largest_difference": 0.0}
    with pytest.raises(RuntimeError, match=r"variables \[1\] of 2"):
        benchmark_hvp.check_products(reverse, [reverse[0], None])
    # 0.01 off in one entry: 0.005 of the largest entry (2), above 1e-3.
    off = [reverse[0] + np.eye(2, 3) * 0.01, reverse[1]]
    with pytest.raises(RuntimeError, match="variable 0 differs .* by 0.005"):
        benchmark_hvp.check_products(reverse, off)


@pytest.mark.parametrize("parts", ["", "apply,steps", ","])
def test_an_unknown_part_exits_2_with_one_line(parts, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--quick", "--parts", parts])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--parts" in error and (
        "apply, step, memory, hvp, memory_second_size, memory_parameters, "
        "memory_arrays, jax, torch") in error


def test_a_tensorflow_part_on_another_backend_exits_2_naming_it(
        monkeypatch, capsys):
    monkeypatch.setattr(benchmark.keras.backend, "backend", lambda: "jax")
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--quick", "--parts", "step,jax,hvp"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(
        "--parts step,hvp needs Keras's TensorFlow backend; KERAS_BACKEND is "
        "'jax', where the parts are jax, torch")
