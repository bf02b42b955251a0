"""`python -m hl_monitor.chaos`: run the scenarios and write the results table (used by `make chaos`)."""

from __future__ import annotations

import sys

from hl_monitor.chaos.cli import main

sys.exit(main())
