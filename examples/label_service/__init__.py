"""The label service example: ``python -m examples.label_service --help``."""
