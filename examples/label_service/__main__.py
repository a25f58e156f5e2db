"""``python -m examples.label_service``: run the label service (see README.md here)."""

from __future__ import annotations

import sys

from examples.label_service.app import main

sys.exit(main())
