"""The batch-size report of a sweep directory: report.json, report.md, PNG plots and TensorBoard HParams data.

The command line of pipeline.study.sweep_report, which holds what it does; this module only runs its main().
"""

import sys

from pipeline.study.sweep_report import main

if __name__ == "__main__":
    sys.exit(main())
