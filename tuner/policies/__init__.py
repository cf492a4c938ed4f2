"""KV-cache policy families: each a frozen dataclass with ``plan(spec)`` and ``select(...)``."""
