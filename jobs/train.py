"""`ray job submit -- python jobs/train.py ...`: skip-aware training as a Ray job.

Thin entry point: the arguments are those of `skipray train` (see `skipray train --help`); with
`--workers N` it runs data-parallel on Ray Train across the cluster.
"""

import sys

from skipray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
