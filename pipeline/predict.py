"""Classifies image files with TF Serving or a local SavedModel: `python -m pipeline.predict IMG.png --server HOST:PORT`.

The command line of pipeline.serving.client, which holds what it does; this module only runs its main().
"""

import sys

from pipeline.serving.client import main

if __name__ == "__main__":
    sys.exit(main())
