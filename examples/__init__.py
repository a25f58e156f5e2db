"""Runnable examples of backends that publish to Relay (run from the repository root)."""
