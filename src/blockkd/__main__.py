"""``python -m blockkd``: the same as the ``blockkd`` command."""
from .cli import main

raise SystemExit(main())
