"""`python -m elasticfleet.cli` runs the command line."""

from elasticfleet.cli.main import main

raise SystemExit(main())
