"""cdc-audit: a tamper-evident audit trail for PostgreSQL."""

__version__ = "0.1.0"

from .app_events import alog_event, log_event
from .context import acontext, aset_context, context, set_context
from .query import AuditReader

__all__ = [
    "AuditReader",
    "__version__",
    "acontext",
    "alog_event",
    "aset_context",
    "context",
    "log_event",
    "set_context",
]
