"""`python jobs/generate.py ...` / `ray job submit --working-dir . -- python jobs/generate.py ...`: the
offline batch job. Thin entry point: the arguments are those of `python -m skipray.batch --help`
(``skipray.batch.cli``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a working dir

from skipray.batch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
