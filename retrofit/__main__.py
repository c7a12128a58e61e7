"""``python -m retrofit ...``: the ``retrofit`` command line."""

import sys

try:
    from retrofit.cli import main
except KeyboardInterrupt:  # a Ctrl-C while the imports run: no traceback
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
