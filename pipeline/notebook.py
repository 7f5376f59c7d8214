"""Runs the batch-size notebook on a sweep: `python -m pipeline.notebook sweeps/digits-resnet20`.

Executes notebooks/batch_size_study.ipynb top to bottom in a Python kernel started in the current working directory,
on the sweep folder given (relative to the current working directory), and writes the executed copy, with its
tables and plots, into the sweep folder; the committed notebook stays without outputs. Needs the notebook extra:
`python -m pip install -e ".[notebook]"` (nbclient, nbformat, ipykernel).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

from pipeline import cli, flags, startup
from pipeline.config import InputError

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks",
                        "batch_size_study.ipynb")
DEFAULT_SWEEP = os.path.join("sweeps", "digits-resnet20")  # what `python -m pipeline.sweep` writes by default
NEEDS = ("nbclient", "nbformat", "ipykernel")  # the notebook extra in setup.cfg


def parser() -> argparse.ArgumentParser:
    p = flags.Parser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sweep_dir", nargs="?", default=DEFAULT_SWEEP, metavar="SWEEP_DIR",
                   help="the sweep folder (pipeline.sweep --out), relative to the current working directory")
    p.add_argument("--out", default="", metavar="FILE.ipynb",
                   help="where the executed notebook goes (default: SWEEP_DIR/batch_size_study.ipynb)")
    p.add_argument("--timeout", type=int, default=600, help="seconds one cell may take")
    return p


def check_installed() -> None:
    """Raises InputError naming the first package of the notebook extra that is missing."""
    for package in NEEDS:
        if importlib.util.find_spec(package) is None:
            raise InputError(f"{package} is not installed; the notebook extra installs it: "
                             'python -m pip install -e ".[notebook]"')


def run(sweep_dir: str, out: str, timeout: int = 600) -> str:
    """Executes the notebook on sweep_dir with the kernel in the current working directory; returns `out`.

    Raises:
      InputError: the sweep folder holds no runs.
      nbclient.exceptions.CellExecutionError: a cell failed.
    """
    import nbformat
    from nbclient import NotebookClient

    sweep_dir = os.path.abspath(sweep_dir)
    if not os.path.isdir(os.path.join(sweep_dir, "runs")):
        raise InputError(f"SWEEP_DIR: {sweep_dir} holds no runs; make a sweep first (python -m pipeline.sweep --out DIR)")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    os.environ["BATCHSCOPE_SWEEP_DIR"] = sweep_dir  # the kernel inherits the environment
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": "."}})
    if os.environ.get(startup.ENV) == "1":
        client.execute()
    else:
        # The kernel process logs its own start-up warnings (e.g. about its local TCP transport) to stderr; they are
        # shown only when a cell fails.
        with tempfile.TemporaryFile(mode="w+") as kernel_log:
            try:
                client.execute(stderr=kernel_log)
            except Exception:
                kernel_log.seek(0)
                sys.stderr.write(kernel_log.read())
                raise
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    nbformat.write(notebook, out)
    return out


def main(argv=None) -> int:
    """Parses flags, runs the notebook, prints where the executed copy is; bad input: one line, exit 2."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)

    def command() -> int:
        check_installed()
        startup.quiet_libraries()  # the kernel's own start-up messages are not shown either
        try:
            out = run(args.sweep_dir, args.out or os.path.join(args.sweep_dir, os.path.basename(NOTEBOOK)),
                      args.timeout)
        except Exception as e:  # nbclient's CellExecutionError (its module needs the extra): say which cell failed
            if type(e).__name__ != "CellExecutionError":
                raise
            print(f"error: the notebook failed in a cell: {e.ename}: {e.evalue}", file=sys.stderr)
            return 1
        print(f"notebook: {out}")
        return 0

    return cli.run(command, "interrupted; run the same command again to execute the notebook")

if __name__ == "__main__":
    sys.exit(main())
