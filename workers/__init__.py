"""mailpool: a Redis-backed email worker pool for the Email ASGI message format."""

__version__ = "0.1.0"
