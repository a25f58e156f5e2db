"""``python -m relay``: the ``relay`` command, a program above the package (see relay_cli).

Nothing imports this file (``import relay`` never runs it), so its import of relay_cli
puts no arrow from the package back up; tests/test_layers.py allows it for this file only.
"""

from relay_cli import main

raise SystemExit(main())
