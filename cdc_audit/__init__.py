"""cdc-audit: a tamper-evident audit trail for PostgreSQL."""

__version__ = "0.1.0"

from .context import context, set_context

__all__ = ["__version__", "context", "set_context"]
