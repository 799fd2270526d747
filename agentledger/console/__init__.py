"""`agentledger serve`: the read-only web console (Starlette, Jinja2, uvicorn; extra ``console``).

The one adapter of those libraries: nothing else in agentledger imports them. Like the CLI, it
reaches the stages only through `agentledger.api`."""

from .app import Console, group_timeline, is_loopback, make_app, needs_token, serve, url

__all__ = ["Console", "group_timeline", "is_loopback", "make_app", "needs_token", "serve", "url"]
