"""``python -m spheretorch``: the same command line as the ``spheretorch`` script."""

from .cli import main

raise SystemExit(main())
