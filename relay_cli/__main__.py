"""``python -m relay_cli``: the ``relay`` command."""

from relay_cli.main import main

raise SystemExit(main())
