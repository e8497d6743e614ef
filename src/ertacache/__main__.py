"""``python -m ertacache``."""

from .cli import main

raise SystemExit(main())
