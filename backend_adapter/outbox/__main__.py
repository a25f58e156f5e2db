"""``python -m backend_adapter.outbox``: the same as ``relay outbox-dispatch``."""

import sys

from backend_adapter.outbox._cli import main

sys.exit(main())
