"""``python -m itmkit``: the same as the ``itmkit`` command."""

from itmkit.cli import main

raise SystemExit(main())
