"""Batch-size sweeps over train(): `python -m pipeline.sweep --batch 8,16,32,64,128,256 --norm batch,group`.

The command line of pipeline.study.batch_sweep, which holds what it does; this module only runs its main().
"""

import sys

from pipeline.study.batch_sweep import main

if __name__ == "__main__":
    sys.exit(main())
