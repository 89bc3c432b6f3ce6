"""Every figure table of README.md, BENCHMARKS.md and docs/, generated
from the committed results in benchmarks/.

    python -m train.figures          # rewrite every table from its JSON
    python -m train.figures --check  # rewrite nothing; exit 1 if one differs

A generated table sits between two markers that name the table and the
JSON it is made from, relative to the repository's root:

    <!-- figures: memory_cells benchmarks/benchmark.json -->
    | cell | TF XLA | ...
    <!-- /figures -->

and the `.md` written beside a result when it was measured (`GENERATED`)
is made again from its JSON. A figure copied by hand drifts from the
measurement it quotes; the default test suite runs the check
(tests/test_benchmark_report.py), so a committed table is what its JSON
says. Prose that quotes a figure points at a table instead.
"""

import argparse
import json
import pathlib
import re
import sys

from train import benchmark_report, compare_report

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The Markdown files that may hold generated tables.
PAGES = ("README.md", "BENCHMARKS.md", "docs/*.md")


def compare_summary(report):
    """The comparison's result table and AdamW's budgets, without the
    list of every run (that is in compare.md)."""
    return compare_report.markdown(report).split("\n\nEvery run")[0]


# Name in a marker -> the table made from the JSON's contents.
TABLES = {
    "headline": benchmark_report.headline,
    "hvp_table": benchmark_report.hvp_table,
    "memory_cells": benchmark_report.memory_cells,
    "profile": benchmark_report.profile,
    "step_table": benchmark_report.step_table,
    "compare_summary": compare_summary,
}
# Whole files, each made from the JSON beside it by the program that
# measured it.
GENERATED = {
    "benchmarks/benchmark.md": (benchmark_report.markdown,
                                "benchmarks/benchmark.json"),
    "benchmarks/benchmark-torch.md": (benchmark_report.markdown,
                                      "benchmarks/benchmark-torch.json"),
    "benchmarks/compare/compare.md": (compare_report.markdown,
                                      "benchmarks/compare/compare.json"),
}
BLOCK = re.compile(
    r"^(<!-- figures: (?P<name>\S+) (?P<source>\S+) -->\n)(?P<table>.*?)"
    r"^(<!-- /figures -->)$", re.DOTALL | re.MULTILINE)


class FiguresError(Exception):
    """A marker naming no table, or a JSON that is not there."""


def load(root, source, where):
    path = root / source
    if not path.is_file():
        raise FiguresError(f"{where}: {source} does not exist")
    return json.loads(path.read_text())


def regenerate(text, root, page):
    """`text` (the Markdown file `page`) with every block's table made
    again, and the names of the blocks that changed."""
    changed = []

    def table(match):
        where = f"{page}:{text.count(chr(10), 0, match.start()) + 1}"
        name = match["name"]
        if name not in TABLES:
            raise FiguresError(f"{where}: no table named {name!r}; the "
                               f"tables are {', '.join(sorted(TABLES))}")
        fresh = TABLES[name](load(root, match["source"], where)) + "\n"
        if fresh != match["table"]:
            changed.append(name)
        return match[1] + fresh + match[5]

    return BLOCK.sub(table, text), changed


def refresh(root=None, check=False):
    """Regenerates every table and generated file under `root` (default:
    this repository; writes nothing if `check`); returns what differed,
    as `page (table)`."""
    root = ROOT if root is None else root
    stale = []
    pages = sorted({path for pattern in PAGES for path in root.glob(pattern)})
    for path in pages:
        page = str(path.relative_to(root))
        text = path.read_text()
        fresh, changed = regenerate(text, root, page)
        stale += [f"{page} ({name})" for name in changed]
        if changed and not check:
            path.write_text(fresh)
    for page, (make, source) in GENERATED.items():
        path = root / page
        fresh = make(load(root, source, page))
        if not path.is_file() or path.read_text() != fresh:
            stale.append(f"{page} (the whole file, from {source})")
            if not check:
                path.write_text(fresh)
    return stale


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a table differs")
    args = parser.parse_args(argv)
    try:
        stale = refresh(check=args.check)
    except FiguresError as error:
        print(f"train.figures: {error}", file=sys.stderr)
        return 2
    if args.check and stale:
        print("Tables that differ from what benchmarks/ says (run python -m "
              "train.figures): " + "; ".join(stale), file=sys.stderr)
        return 1
    print("rewritten: " + "; ".join(stale) if stale
          else "every table is what benchmarks/ says")
    return 0


if __name__ == "__main__":
    sys.exit(main())
