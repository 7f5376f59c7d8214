"""Evaluates an exported SavedModel on a split, and measures its throughput: `python -m pipeline.evaluate RUN_DIR`.

The command line of pipeline.serving.evaluation, which holds what it does; this module only runs its main().
"""

import sys

from pipeline.serving.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
