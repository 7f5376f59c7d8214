"""Renders the benchmark result files (benchmarks/results/*.json) into the documentation's benchmark page.

Usage: python benchmarks/render.py [--out docs/benchmarks.md]

Every figure on the page comes from a result file written by benchmarks/results.py, shown with the date, commit,
machine and load of the run that measured it, its command, and every round's raw numbers. A benchmark script without
a result file gets a line saying so and the command that produces one. The page is rebuilt from the files alone, so
running this twice gives the same page.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md")


def benchmark_scripts() -> dict[str, str]:
    """{script file name: first docstring line} of every script here that writes a result file."""
    scripts = {}
    for path in sorted(glob.glob(os.path.join(HERE, "*.py"))):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        calls = [node.func for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)]
        if not any(getattr(func, "attr", getattr(func, "id", None)) == "Recorder" for func in calls):
            continue  # not a benchmark: it writes no result file
        first = source.split('"""', 2)[1].strip().splitlines()[0] if source.startswith('"""') else ""
        scripts[os.path.basename(path)] = first
    return scripts


def read_results(directory: str = RESULTS_DIR) -> list[dict]:
    """Every result file, sorted by benchmark name."""
    records = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path, encoding="utf-8") as f:
            records.append(json.load(f))
    return records


def _script_of(record: dict) -> str:
    """The benchmark script a result file was written by, from its command (python benchmarks/x.py ...)."""
    for word in record.get("command", "").split():
        if word.endswith(".py"):
            return os.path.basename(word)
    return ""


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(_cell(item) for item in value)
    if value is True:
        return "yes"
    if value is False:
        return "**no**"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _flat(value) -> bool:
    """A value that fits in a table cell: a number, a string, a flag, or a short list of them."""
    if isinstance(value, list):
        return len(value) <= 12 and all(_flat(item) and not isinstance(item, list) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _rows(value) -> list[dict] | None:
    """Table rows for a list of flat dicts, a dict of flat dicts or a flat dict; None for anything else."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and all(map(_flat, v.values())) for v in value):
        return value
    if isinstance(value, dict) and value and all(isinstance(v, dict) and all(map(_flat, v.values()))
                                                 for v in value.values()):
        return [{"key": key, **row} for key, row in value.items()]
    if isinstance(value, dict) and value and all(map(_flat, value.values())):
        return [{"key": key, "value": item} for key, item in value.items()]
    return None


def render_summary(summary: dict) -> list[str]:
    """The summary figures: its named tables, its single figures as one table, and each nested part as a table (or
    as JSON when it is no table)."""
    lines = []
    for title, rows in summary.get("tables", {}).items():
        lines += [f"**{title}**", "", *_table(rows), ""]
    rest = {key: value for key, value in summary.items() if key != "tables"}
    figures = [{"figure": key, "value": value} for key, value in rest.items() if _flat(value)]
    if figures:
        lines += ["**Figures**", "", *_table(figures), ""]
    for key, value in rest.items():
        if _flat(value):
            continue
        rows = _rows(value)
        lines += [f"**{key}**", ""] + (_table(rows) if rows else ["```json", json.dumps(value, indent=1), "```"]) + [""]
    return lines


def _table(rows: list[dict]) -> list[str]:
    columns = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return lines


def render_record(record: dict) -> list[str]:
    """One result file as a page section: context, summary tables, settings and raw rounds."""
    machine, versions = record.get("machine", {}), record.get("versions", {})
    changed = record.get("changed_files")
    commit = (record.get("commit") or "unknown")[:10] + (
        (f" (with uncommitted changes to {', '.join(changed)})" if changed else " (with uncommitted changes)")
        if record.get("dirty") else "")
    load = f"load average {machine.get('load_before')} before, {machine.get('load_after')} after"
    lines = [
        f"### `{record['benchmark']}`",
        "",
        f"- command: `{record.get('command', '')}`",
        f"- measured: {record.get('started', '?')} to {record.get('finished', '?')} (UTC), commit {commit}",
        f"- machine: {machine.get('cpus')} CPUs, {machine.get('cpu_model')}, {machine.get('system')}; {load} "
        "(1, 5 and 15 minutes)",
        "- versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        "",
    ]
    lines += render_summary(record.get("summary", {}))
    lines += ["Settings:", "", "```json", json.dumps(record.get("settings", {}), indent=1, sort_keys=True), "```", ""]
    lines += ["Every round's raw numbers:", "", "```json", json.dumps(record.get("rounds", []), indent=1), "```", ""]
    return lines


def render(records: list[dict], scripts: dict[str, str]) -> str:
    """The benchmark page: one section per benchmark script, with its result files or a note that it has none."""
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/render.py from benchmarks/results/*.json; edit those, not this page. -->",
        "",
        "Each figure below comes from a result file in `benchmarks/results/`, written by the benchmark itself "
        "(`benchmarks/results.py`), with the date, commit and machine of the run that measured it. Benchmarks print "
        "ratios measured side by side in one run: on a shared or loaded machine the absolute times move between runs, "
        "the ratios less; the load average before and after each run is given so a reader can judge. A new run of a "
        "benchmark replaces its result file (older runs stay in the git history); `python benchmarks/render.py` "
        "rebuilds this page.",
        "",
    ]
    for script, description in scripts.items():
        lines += [f"## `benchmarks/{script}`", "", description, ""]
        mine = [record for record in records if _script_of(record) == script]
        if not mine:
            lines += [f"No result file yet; run `python benchmarks/{script}`.", ""]
        for record in mine:
            lines += render_record(record)
    orphans = [record for record in records if _script_of(record) not in scripts]
    if orphans:
        lines += ["## Other result files", ""]
        for record in orphans:
            lines += render_record(record)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="the page to write")
    args = parser.parse_args(argv)
    page = render(read_results(), benchmark_scripts())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
