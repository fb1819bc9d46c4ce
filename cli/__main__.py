"""`python -m elasticfleet` runs the command line."""

from elasticfleet.cli import main

raise SystemExit(main())
