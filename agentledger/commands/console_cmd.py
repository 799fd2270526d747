"""`agentledger serve`: the read-only web console (agentledger/console, extra ``console``)."""

from __future__ import annotations

from typing import Optional

import typer

from agentledger.schemas.errors import ConfigError

from ..output import console
from .options import settings

app = typer.Typer()


@app.command("serve")
def serve(
    ctx: typer.Context,
    port: int = typer.Option(8765, "--port", help="TCP port (0: any free port, printed)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Any address but loopback "
                                                         "requires the printed token on every request."),
    token: Optional[str] = typer.Option(None, "--token", envvar=None, hidden=True,
                                        help="Use this token instead of a random one (tests)."),
    sql_timeout: float = typer.Option(30.0, "--sql-timeout", min=0.1,
                                      help="Seconds a query of the SQL page may run before it is interrupted "
                                           "(every page waits for it meanwhile)."),
) -> None:
    """Serve the read-only web console: sessions, timelines step by step, alerts triage, what-if, SQL.

    On 127.0.0.1 (the default) no login is needed; with --host other than loopback a random token is
    printed, like Jupyter, and every page and call needs it. The warehouse is opened read-only per
    request (marking alerts opens it briefly for writing). docs/console.md.

    Example:  agentledger serve --port 8765
    """
    try:
        from agentledger import console as web
    except ImportError as exc:
        raise ConfigError(f"the console needs the extra `console` ({exc.name} is missing): "
                          "pip install 'agentledger[console]'") from exc
    import socket
    import sys

    s = settings(ctx)
    if port == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    app_ = web.make_app(s, host=host, port=port, token=token, sql_timeout_s=sql_timeout)
    console.print(f"agentledger console on {web.url(app_)}  (warehouse {s.warehouse}; Ctrl-C stops it)",
                  soft_wrap=True, highlight=False)
    if app_.token:
        console.print("the token is required on every request: open the URL above once (it sets a cookie)",
                      highlight=False)
    sys.stdout.flush()
    web.serve(app_)
