"""The ``relay`` command: one entry point above both packages.

It serves nodes (``relay``, the server package) and publishes as a backend would
(``backend_adapter``: ``relay publish --redis-url``, ``relay token``, ``relay
outbox-dispatch``), so it imports both; neither imports it, and ``relay`` never imports
``backend_adapter`` (tests/test_layers.py), so the two packages do not form a cycle.
"""

from relay_cli.main import build_parser, main

__all__ = ["build_parser", "main"]
