"""Recommends a batch size and learning rate from a short probe: `python -m pipeline.advise --max-batch 256`.

The command line of pipeline.advisor.recommend, which holds what it does; this module only runs its main().
"""

import sys

from pipeline.advisor.recommend import main

if __name__ == "__main__":
    sys.exit(main())
