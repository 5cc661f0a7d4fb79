"""``python -m skipray.batch ...``: the Parquet file job (see ``skipray.batch.cli``)."""

from skipray.batch.cli import main

raise SystemExit(main())
