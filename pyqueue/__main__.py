"""``python -m pyqueue``: the same as the ``pyqueue`` command."""

from .cli import main

raise SystemExit(main())
