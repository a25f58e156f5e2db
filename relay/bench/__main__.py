"""``python -m relay.bench``: see relay.bench.runner."""

from relay.bench.runner import main

raise SystemExit(main())
