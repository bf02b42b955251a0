from hl_monitor.cli import main

raise SystemExit(main())
