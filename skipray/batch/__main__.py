"""``python -m skipray.batch ...``: the file job (Parquet or OpenAI batch files) (see ``skipray.batch.cli``)."""

from skipray.batch.cli import main

raise SystemExit(main())
