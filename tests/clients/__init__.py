"""Client SDKs in other languages, tested against real nodes."""
