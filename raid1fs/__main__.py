"""`python -m raid1fs` runs the command-line interface."""

from raid1fs.cli import main

raise SystemExit(main())
