"""train.benchmark_report's tables and train.figures, which makes every
committed table from benchmarks/*.json (CI fails on a stale one)."""

import shutil

import pytest

from train import benchmark_report, figures


def test_the_floors_price_a_refresh_by_its_extra_passes():
    # Forward 1, backward 2. In chunks the estimator has a forward pass of
    # its own over the Hessian's share f: GNB adds it and a backward pass
    # (1 + f), Hutchinson it, a backward pass and a product of about two
    # gradients (1 + 3f).
    assert benchmark_report.floor("g", 1.0) == pytest.approx(2.0)
    assert benchmark_report.floor("g", 0.5) == pytest.approx(1.5)
    assert benchmark_report.floor("h", 0.5) == pytest.approx(2.5)
    assert benchmark_report.cycle_floor("h", 1.0) == pytest.approx(1.3)
    # Sharing the training pass: GNB adds a backward pass over f (1 +
    # 2f/3), Hutchinson the product (1 + 2f); at k = 10 the 1.067
    # and 1.033 for GNB.
    assert benchmark_report.floor("g", 1.0, shared=True) == pytest.approx(5 / 3)
    assert benchmark_report.floor("h", 0.5, shared=True) == pytest.approx(2.0)
    assert benchmark_report.cycle_floor("g", 1.0, shared=True) == pytest.approx(
        1.0667, abs=1e-4)
    assert benchmark_report.cycle_floor("g", 0.5, shared=True) == pytest.approx(
        1.0333, abs=1e-4)
    assert benchmark_report.cycle_floor("h", 1.0, shared=True) == pytest.approx(1.2)


def ratios_result():
    """A result with the settings of the full benchmark and peak-memory
    ratios chosen to exercise each way a cell is written."""
    settings = {
        "batch_size": 16, "block_size": 64,
        "second_size": {"memory_flags": ["--model", "30m", "--batch-size",
                                         "4", "--block-size", "1024"]},
        "parameter_size": {"memory_flags": [
            "--model", "125m", "--batch-size", "1", "--block-size", "128"]},
        "arrays": {"memory_flags": ["--batch-size", "16", "--block-size",
                                    "64"]}}
    ratios = {}
    for variant in ("g", "g_half_batch", "h", "h_half_batch"):
        ratios[f"sophia_{variant}_xla"] = 1.0
        ratios[f"sophia_{variant}_jax"] = 1.001
        ratios[f"sophia_{variant}_xla_parameters"] = (
            1.15 if variant.startswith("g") else 1.35)
    ratios.update({"sophia_g_graph": 1.203, "sophia_g_half_batch_graph": 1.21,
                   "sophia_h_graph": 1.12, "sophia_h_half_batch_graph": 1.12})
    return {"settings": settings, "peak_memory_ratio_vs_adamw": ratios}


def test_memory_cells_are_the_ratios_per_size_and_mode():
    rows = benchmark_report.memory_cells(ratios_result()).splitlines()
    assert rows[0] == "| cell | TF XLA | TF graph | JAX | <= 1.1 |"
    # Tiny: every XLA and JAX variant rounds to 1.00 (one figure); graph G
    # 1.203 and 1.21 -> 1.20-1.21, H both 1.12; graph misses, the others
    # meet the target.
    assert rows[2] == ("| tiny, 16 x 64 (activations) | 1.00 | G 1.20-1.21, "
                       "H 1.12 | 1.00 | TF XLA yes, TF graph no, JAX yes |")
    assert rows[3] == ("| 30m, 4 x 1024 (activations) | not measured | "
                       "not measured | not measured |  |")
    assert rows[4] == ("| 125m, 1 x 128 (parameters) | G 1.15, H 1.35 | "
                       "not measured | not measured | no |")
    assert rows[5].startswith("| tiny, 16 x 64 (`fit` on arrays")
    assert rows[5].endswith("| not measured | not measured | the static "
                            "batch's (JAX traces shapes) |  |")


def copy_of_the_repository(tmp_path):
    """The pages and results `figures` reads, in a scratch root."""
    for page in ("README.md", "BENCHMARKS.md"):
        shutil.copy(figures.ROOT / page, tmp_path / page)
    shutil.copytree(figures.ROOT / "docs", tmp_path / "docs")
    shutil.copytree(figures.ROOT / "benchmarks", tmp_path / "benchmarks")
    return tmp_path


def test_every_committed_table_is_what_its_json_says():
    assert figures.refresh(check=True) == []


def test_a_stale_table_is_named_by_check_and_rewritten(tmp_path):
    root = copy_of_the_repository(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    start = text.index("<!-- figures: headline")
    end = text.index("<!-- /figures -->", start)
    line = text.index("\n", start) + 1
    readme.write_text(text[:line] + "| a figure copied by hand |\n"
                      + text[end:])
    stale = readme.read_text()
    assert figures.refresh(root, check=True) == ["README.md (headline)"]
    assert readme.read_text() == stale  # --check writes nothing
    assert figures.refresh(root) == ["README.md (headline)"]
    assert readme.read_text() == text
    assert figures.refresh(root, check=True) == []


def test_a_marker_naming_no_table_exits_2_with_one_line(
        tmp_path, monkeypatch, capsys):
    root = copy_of_the_repository(tmp_path)
    page = root / "docs" / "extra.md"
    page.write_text("Intro.\n\n<!-- figures: nope benchmarks/benchmark.json "
                    "-->\n<!-- /figures -->\n")
    monkeypatch.setattr(figures, "ROOT", root)
    assert figures.main(["--check"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("train.figures: docs/extra.md:3: no table named "
                            "'nope'; the tables are compare_summary, ")
