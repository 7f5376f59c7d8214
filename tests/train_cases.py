"""`python -m pipeline.train` for many argument lists in one process, each as a user would run it, for tests of the
command line that would otherwise start one process (and one TensorFlow) per case.

Usage: python tests/train_cases.py CASES.json OUT.json, where CASES.json holds a list of argument lists;
OUT.json gets, per case, {"code": exit code, "stdout": ..., "stderr": ...}: everything written to the file descriptors
1 and 2 while that case ran (Python's and C++'s lines alike; TensorFlow's start-up lines in the first case that
imports it). Python's warning filters stay the defaults a user has, and each case shows a warning again as a fresh process
would, however often an earlier case raised it.
"""

import json
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import train  # noqa: E402


def run_case(argv: list[str]) -> dict:
    # A filter that changes nothing (the action of any warning no other filter matches), whose addition makes Python
    # forget where it has shown a warning before ("default": once per place in a process).
    warnings.simplefilter("default", append=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        try:
            code = train.main(argv)
        except SystemExit as e:  # argparse exits for a bad flag
            code = e.code
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", "replace"))
    return {"code": code, "stdout": texts[0], "stderr": texts[1]}


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    results = [run_case(argv) for argv in cases]
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(results, f)
