"""Generates the documentation's reference pages from the code: the flags of every entry point and the run directory.

Usage (from the repository root, before `mkdocs build`):

    python docs/gen_reference.py                  # both pages
    python docs/gen_reference.py --flags-only     # the flag reference alone (no TensorFlow, a second)

- docs/reference/flags.md: every flag of `python -m pipeline.train|sweep|advise|evaluate|predict`, read from the
  parser each entry point builds (so from `Config`'s fields and their help metadata for the training flags), with
  its default and help text.
- docs/reference/run-directory.md: what a run writes, listed from a real run: a tiny training run (`smoke()`
  preset, one epoch, a target accuracy) and `pipeline.evaluate` of it, made in a temporary folder at build time.
  The keys of summary.json come with the comments of the `Summary` dataclass that writes them; the description of
  each file is kept below, and the build fails when the run writes a file that has none or a described file is
  missing, so the page cannot drift from the code.

`entry_point_parser` is also what tests/test_readme.py checks the README's flags against.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import glob
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "docs", "reference")
FIRST = ("train", "sweep", "advise", "evaluate", "predict", "report")  # the order of the flag reference


def _entry_points() -> tuple[str, ...]:
    """pipeline.<name> for every module of pipeline/ that runs as `python -m pipeline.<name>`."""
    names = []
    for path in glob.glob(os.path.join(ROOT, "pipeline", "*.py")):
        with open(path, encoding="utf-8") as f:
            if 'if __name__ == "__main__":' in f.read():
                names.append(os.path.splitext(os.path.basename(path))[0])
    names.sort(key=lambda name: (FIRST.index(name) if name in FIRST else len(FIRST), name))
    return tuple(f"pipeline.{name}" for name in names)


ENTRY_POINTS = _entry_points()


class _Parsed(BaseException):
    """Raised in place of parsing, to stop an entry point's main() once it has built its parser."""


def entry_point_parser(module_name: str) -> argparse.ArgumentParser | None:
    """The argparse parser that `python -m <module_name>` parses its arguments with, or None if it uses none.

    The entry point's main() is called and stopped at the moment it parses (no TensorFlow is started: every entry
    point parses its flags first).
    """
    module = importlib.import_module(module_name)
    captured = {}
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise _Parsed

    argparse.ArgumentParser.parse_known_args = capture
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()  # pipeline.report prints its usage line instead of parsing
    try:
        module.main(["--help"])
    except (_Parsed, SystemExit):
        pass
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.stdout, sys.stderr = stdout, stderr
    return captured.get("parser")


_DEFAULT = re.compile(r"\s*\(default: (.*)\)\s*$")


def flag_rows(parser: argparse.ArgumentParser) -> list[dict]:
    """One dict per option of the parser: flags (its option strings), default (as text) and help."""
    rows = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        help_text = (action.help or "").replace("%%", "%")  # argparse's escape of a literal %
        if action.default is argparse.SUPPRESS:  # Config flags: the preset's default is in the help text
            found = _DEFAULT.search(help_text)
            default = found.group(1) if found else ""
            help_text = _DEFAULT.sub("", help_text)
        elif action.default is None:
            default = ""
        elif isinstance(action.default, tuple):
            default = ",".join(map(str, action.default))
        else:
            default = repr(action.default) if isinstance(action.default, str) else str(action.default)
        if action.choices:
            help_text += " (one of " + ", ".join(map(str, action.choices)) + ")"
        rows.append({"flags": list(action.option_strings), "default": default, "help": help_text})
    return rows


def _plain_default(text: str) -> str:
    """'32' for 32, 'resnet20' for 'resnet20', as a reader types it."""
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == "'" else text


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def flags_page() -> str:
    sys.path.insert(0, ROOT)
    lines = [
        "# Flag reference",
        "",
        "<!-- Generated by docs/gen_reference.py from the entry points' parsers; do not edit. -->",
        "",
        "Every flag of every entry point, with its default, read from the parser the entry point builds. The "
        "training flags are generated one per field of the frozen `Config` (`pipeline/config.py`), with the help "
        "text of the field's metadata: `--warmup-epochs` sets `warmup_epochs`. `--config FILE.json` reads a config "
        "(a run's own `config.json` works) that the flags then override. A boolean field has `--name` and "
        "`--no-name`.",
        "",
    ]
    for module_name in ENTRY_POINTS:
        module = importlib.import_module(module_name)
        lines += [f"## `python -m {module_name}`", "", (module.__doc__ or "").strip().splitlines()[0], ""]
        parser = entry_point_parser(module_name)
        if parser is None:
            lines += ["Takes no flags: " + (module.main.__doc__ or "").strip().splitlines()[0], ""]
            continue
        positionals = [a for a in parser._actions if not a.option_strings]
        for action in positionals:
            lines += [f"- `{action.metavar or action.dest}`: {_escape(action.help or '')}"]
        if positionals:
            lines.append("")
        lines += ["| flag | default | what |", "|---|---|---|"]
        for row in flag_rows(parser):
            names = ", ".join(f"`{name}`" for name in row["flags"])
            default = _plain_default(row["default"])
            lines.append(f"| {names} | {'`' + default + '`' if default else ''} | {_escape(row['help'])} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# What each entry of a run directory is. The build fails if a tiny real run writes an entry not listed here, or
# does not write one listed here (except those marked optional, which the tiny run cannot make).
RUN_FILES = {
    "curvature.jsonl": "with `--curvature-every N`: every curvature measurement (largest Hessian eigenvalue, trace "
                       "with its interval, stability ratio)",
    "config.json": "the resolved config (`config`: every `Config` field; reload it with `--config`), the "
                   "effective learning rate, TensorFlow/Keras/TFDS versions, git commit, command line and the "
                   "parallel setup (`parallel`)",
    "metrics.jsonl": "the history: one JSON line per epoch (keys below); the one file resume and the reports read",
    "metrics.csv": "the same per-epoch values as CSV (Keras `CSVLogger`, stable columns: `nan` where an "
                   "instrument did not measure in that epoch)",
    "tensorboard/": "TensorBoard logs: Keras' per-epoch scalars `epoch_<key>` in the folders `train/` and "
                    "`validation/`; every gradient-statistics measurement (x axis: step) in the folder `gradients/`, "
                    "tags `grad/...`, `grad_variables/...`, `grad_mean/...`, `grad_std/...`; the BatchNorm statistics "
                    "and learning dynamics in the top folder itself, under the tag prefixes `bn/` and `dynamics/`; with "
                    "`--batch adaptive`, `train/batch_size` and `train/lr_gain` by step in the folder `batch/`",
    "grad_stats.jsonl": "every gradient-statistics measurement: the estimates with their 95% intervals, and per "
                        "variable at every 10th measurement",
    "bn_stats.json": "every BatchNorm-statistics measurement, per layer, with the averages over layers",
    "bn_stats.md": "a per-layer table of the last BatchNorm-statistics measurement",
    "dynamics/": "learning dynamics: `forgetting.json`, `class_accuracy.png`, `gallery_forgotten.png`, "
                 "`gallery_misclassified.png`",
    "checkpoints/": "the last two finished epochs: weights and optimizer state (`epoch-NNNN.weights.h5`), the "
                    "instruments' state (`epoch-NNNN.instruments.json`), and `checkpoint.json`, which names the latest "
                    "and is renamed into place last",
    "export/": "the SavedModel in TF Serving's layout (`<model>/<version>/` with `assets.extra/`), `models.config` "
               "and `batching_parameters.txt` (see Serving)",
    "target.json": "with `--target-accuracy`: the step, epoch and time at which validation accuracy first reached "
                   "it",
    "evaluation/": "written by `python -m pipeline.evaluate RUN`: one folder per split with `evaluation.json`, "
                   "`confusion_matrix.json`, the plots and TensorBoard images",
    "summary.json": "how the run ended and what it measured (keys below); written by every ending of a started run",
    "batch_decisions.jsonl": "with `--batch adaptive`: one line per decision at an epoch's end (step, old and new "
                             "batch and learning rate, the pooled noise scale with its interval, the predicted goodput "
                             "gain, the policy and its reason; see Adaptive batch)",
    "target_checks.npz": "with `--target-accuracy`: which validation examples each target check classified "
                         "correctly, the data of the sweep report's bootstrap intervals of steps and time to target",
}
# Entries that the tiny run may not write (the curvature instrument is off by default, the batch is fixed).
OPTIONAL = ("target_checks.npz", "curvature.jsonl", "batch_decisions.jsonl")
# summary.json keys whose Summary field has no comment of its own.
SUMMARY_NOTES = {
    "run_dir": "the run directory",
    "workers": "worker processes (more than 1 only under `--strategy multiworker`)",
    "val_accuracy": "accuracy on the validation split, with the statistics the exported model uses",
    "test_accuracy": "accuracy on the test split, with the statistics the exported model uses",
    "test_loss": "loss on the test split",
    "epochs": "epochs trained",
    "time_per_step_s": "median seconds per training step over the epochs after the first, the instruments' "
                       "measuring left out (defined in `pipeline/rundir.py`; the sweep report shows the same number)",
    "export_path": "the exported SavedModel version folder (null with `--no-export`)",
    "target_accuracy": "`--target-accuracy`, when one was given",
}


def _summary_comments() -> dict[str, str]:
    """{field: comment} of the Summary dataclass (summary.json), read from its source beside each field."""
    for path in sorted(glob.glob(os.path.join(ROOT, "pipeline", "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        if "class Summary" not in source:
            continue
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.name == "Summary":
                comments = {}
                for item in node.body:
                    if not isinstance(item, ast.AnnAssign):
                        continue
                    line = lines[item.lineno - 1]
                    above, index = [], item.lineno - 2
                    while index >= 0 and lines[index].strip().startswith("#"):  # a comment block over the field
                        above.insert(0, lines[index].strip().lstrip("# ").strip())
                        index -= 1
                    inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
                    comments[item.target.id] = inline or " ".join(above)
                doc = ast.get_docstring(node) or ""
                comments[""] = doc.splitlines()[0] if doc else ""
                return comments
    raise SystemExit("gen_reference: no `class Summary` found under pipeline/")


def _tiny_run(scratch: str) -> str:
    """Runs a tiny training (and pipeline.evaluate of it) as a user would; returns its run directory."""
    sys.path.insert(0, ROOT)
    from pipeline import config as config_lib

    config = dataclasses.replace(config_lib.smoke(), epochs=1, target_accuracy=0.5)
    config_file = os.path.join(scratch, "tiny.json")
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(config_lib.to_dict(config), f)
    run_dir = os.path.join(scratch, "run")
    environment = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for command in (["pipeline.train", "--config", config_file, "--run-dir", run_dir],
                    ["pipeline.evaluate", run_dir]):
        done = subprocess.run([sys.executable, "-m", *command], cwd=scratch, env=environment, capture_output=True,
                              text=True, check=False)
        if done.returncode:
            raise SystemExit(f"gen_reference: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return run_dir


def _tree(path: str, depth: int = 0, max_depth: int = 3) -> list[str]:
    """The folder's entries, indented, TensorBoard event files (named after host and time) as one pattern."""
    lines = []
    names = sorted(os.listdir(path))
    events = [name for name in names if name.startswith("events.out.tfevents.")]
    if events:
        names = [name for name in names if name not in events]
        lines.append("    " * depth + f"events.out.tfevents.* ({len(events)} file{'s' if len(events) > 1 else ''})")
    for name in names:
        full = os.path.join(path, name)
        if os.path.isdir(full):
            lines.append("    " * depth + name + "/")
            if depth + 1 < max_depth:
                lines += _tree(full, depth + 1, max_depth)
        else:
            lines.append("    " * depth + name)
    return lines


def run_directory_page() -> str:
    comments = _summary_comments()
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = _tiny_run(scratch)
        entries = {name + ("/" if os.path.isdir(os.path.join(run_dir, name)) else "") for name in os.listdir(run_dir)}
        undescribed = sorted(entries - set(RUN_FILES))
        missing = sorted(set(RUN_FILES) - entries - set(OPTIONAL))
        if undescribed or missing:
            raise SystemExit(f"gen_reference: the run directory changed: not described {undescribed}, described but "
                             f"not written {missing}; update RUN_FILES in docs/gen_reference.py")
        tree = _tree(run_dir)
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            config_keys = list(json.load(f))
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            history_keys = []
            for line in f:
                history_keys += [key for key in json.loads(line) if key not in history_keys]
    lines = [
        "# Run directory reference",
        "",
        "<!-- Generated by docs/gen_reference.py from a tiny real run; do not edit. -->",
        "",
        "A run writes everything to its run directory: `runs/<time>-<model>-b<batch>`, or `--run-dir`. The run "
        "directory is created only once the config, the data, the batch sizes and the checkpoint to resume are "
        "accepted. The listing below is what a tiny run wrote when this page was built (`smoke()` preset, one "
        "epoch, `--target-accuracy 0.5`, then `python -m pipeline.evaluate` of the run).",
        "",
        "| entry | what |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {RUN_FILES[name]} |" for name in sorted(RUN_FILES)]
    lines += ["", "The tiny run's files:", "", "```", *tree, "```", "", "## summary.json", "",
              _escape(comments.get("", "")), "", "| key | what |", "|---|---|"]
    for key in summary:
        lines.append(f"| `{key}` | {_escape(comments.get(key) or SUMMARY_NOTES.get(key, ''))} |")
    lines += ["", "## config.json", "", "Top-level keys: " + ", ".join(f"`{k}`" for k in config_keys) + ". "
              "`config` holds every field of `Config`, one per training flag ([flag reference](flags.md)).", "",
              "## metrics.jsonl", "",
              "One JSON object per epoch. An instrument's keys (`grad/*`, `bn/*`, `dynamics/*`) appear only in an "
              "epoch in which it measured, with the step of that measurement (`grad/step`, `bn/step`). Keys the tiny "
              "run wrote:", "", ", ".join(f"`{k}`" for k in history_keys), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flags-only", action="store_true", help="write only the flag reference")
    args = parser.parse_args(argv)
    os.makedirs(REFERENCE, exist_ok=True)
    pages = {"flags.md": flags_page}
    if not args.flags_only:
        pages["run-directory.md"] = run_directory_page
    for name, make in pages.items():
        path = os.path.join(REFERENCE, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(make())
        print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
