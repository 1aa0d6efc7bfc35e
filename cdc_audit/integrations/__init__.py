"""Helpers that set the audit context for each transaction from the current actor.

`actor` holds the current actor in a contextvar; the web middlewares (`asgi`, `wsgi`,
`django`) fill it from the request, and the database hooks (`psycopg`, `sqlalchemy`,
`django`) send it with each transaction as transaction-local settings. The modules for
optional packages import them only when imported themselves.
"""

from .actor import Actor, acting_as, current_actor, current_context

__all__ = ["Actor", "acting_as", "current_actor", "current_context"]
