"""``python -m retrofit ...``: the ``retrofit`` command line."""

from retrofit.cli import main

raise SystemExit(main())
