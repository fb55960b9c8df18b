"""``python -m mpcompiler``: the command line of :mod:`mpcompiler.cli`."""

from mpcompiler.cli import main

raise SystemExit(main())
