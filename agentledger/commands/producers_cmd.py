"""keys generate / list, spool status / drain: the producer side's durability and signing tools."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..output import Format, console, print_json, render_rows

keys_app = typer.Typer(
    help="Checkpoint signing keys (Ed25519).\n\nExample:  agentledger keys generate",
    no_args_is_help=True,
)
spool_app = typer.Typer(
    help="The producer spool: events held locally while Kafka is unreachable.\n\n"
         "Example:  agentledger spool status",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    from ..cli import settings

    app.add_typer(keys_app, name="keys")
    app.add_typer(spool_app, name="spool")

    @keys_app.command("generate")
    def keys_generate(
        ctx: typer.Context,
        out: Optional[Path] = typer.Option(None, "--out", help="Directory for the key pair. [default: HOME/keys]"),
        activate: Optional[bool] = typer.Option(None, "--activate/--no-activate",
                                                help="Make it the key producers sign with (HOME/keys/current). "
                                                     "[default: yes when writing to HOME/keys]"),
        fmt: Format = typer.Option(Format.table, "--format", help="table or json."),
    ) -> None:
        """Generate an Ed25519 key pair for signing checkpoints: <key_id>.key and <key_id>.pub (0600).

        Key files are refused (by producers and verifiers alike) inside a git work tree, when writable by
        group/others or not owned by you: keep --out outside any repository.

        Producers sign with AGENTLEDGER_SIGNING_KEY / AGENTLEDGER_SIGNING_KEY_FILE if set, else with the key
        named in HOME/keys/current. Give the .pub file to whoever verifies (verify/replay read HOME/keys).

        Example:  agentledger keys generate --out /etc/agentledger/keys
        """
        from agentledger.schemas import signing

        s = settings(ctx)
        default_dir = s.home / "keys"
        directory = out or default_dir
        signer = signing.generate()
        priv, pub = signing.write_keypair(signer, directory)
        active = activate if activate is not None else directory.resolve() == default_dir.resolve()
        if active:
            from agentledger.schemas.homes import write_private_file

            default_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if directory.resolve() != default_dir.resolve():
                write_private_file(default_dir / f"{signer.key_id}.pub", pub.read_bytes())
                link = default_dir / f"{signer.key_id}.key"
                if not link.exists():
                    link.symlink_to(priv.resolve())
            write_private_file(default_dir / "current", (signer.key_id + "\n").encode())
            signing.load_private_file(default_dir / f"{signer.key_id}.key")  # refused here, not at the first event
        result = {"key_id": signer.key_id, "private_key": str(priv), "public_key": str(pub), "active": active}
        if fmt is Format.json:
            print_json(result)
        else:
            console.print(f"key id {signer.key_id}\n  private: {priv} (keep it secret)\n  public:  {pub}"
                          + ("\n  producers now sign checkpoints with it" if active else ""))

    @keys_app.command("list")
    def keys_list(
        ctx: typer.Context,
        directory: Optional[Path] = typer.Option(None, "--dir", help="Key directory. [default: HOME/keys]"),
        fmt: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    ) -> None:
        """List the public keys (key ids) in the key directory, which one signs, and which are a
        simulator's (seed-derived: anyone can sign with them). Older versions put the simulator's key
        among the trusted ones: a row with `simulator` set there should be removed (rm the file).

        Example:  agentledger keys list --format json
        """
        from agentledger.producers.simulate import simulator_seed
        from agentledger.schemas import signing

        s = settings(ctx)
        d = directory or s.home / "keys"
        try:
            current = (d / "current").read_text().strip()
        except OSError:
            current = None
        rows = []
        for p in sorted(d.glob("*.pub")) if d.is_dir() else []:
            data = p.read_bytes()
            kid = signing.key_id(signing.load_public(data))
            seed = simulator_seed(kid)
            sim = f"seed {seed}" if seed is not None else "marked" if signing.is_simulator_key(data) else None
            rows.append([kid, str(p), (d / f"{kid}.key").exists(), kid == current, sim])
        render_rows(["key_id", "public_key", "has_private_key", "signing", "simulator"], rows, fmt)

    @spool_app.command("status")
    def spool_status(
        ctx: typer.Context,
        fmt: Format = typer.Option(Format.table, "--format", help="table or json."),
    ) -> None:
        """Show what the spool holds: undrained events and bytes per topic, the oldest one, and events
        refused because the spool was full (each also recorded as a gap event in its session).

        Example:  agentledger spool status --format json
        """
        from agentledger.producers.sinks import ProducerOptions, spool_dir
        from agentledger.producers.spool import Spool

        s = settings(ctx)
        opts = ProducerOptions.from_env()
        st = Spool(spool_dir(s, opts)).status()
        st["max_bytes"] = opts.spool_max_bytes
        if fmt is Format.json:
            print_json(st)
            return
        console.print(f"spool {st['spool']} — {st['undrained_events']} events ({st['undrained_bytes']} bytes) "
                      f"waiting for Kafka; bound {opts.spool_max_bytes} bytes")
        if st["topics"]:
            cols = ["topic", "undrained_events", "undrained_bytes", "oldest_undrained_at", "drained_offset", "end_offset"]
            render_rows(cols, [[t[c] for c in cols] for t in st["topics"]], Format.table)
        if st["overflow_events"]:
            console.print(f"[bold red]spool overflow:[/] {st['overflow_events']} events ({st['overflow_bytes']} bytes) "
                          f"refused between {st['overflow_first_at']} and {st['overflow_last_at']} in "
                          f"{st['overflow_sessions']} sessions (each session records a spool_overflow gap)")

    @spool_app.command("drain")
    def spool_drain(
        ctx: typer.Context,
        timeout: float = typer.Option(300.0, help="Give up after this many seconds (what is left stays spooled)."),
        follow: bool = typer.Option(False, "--follow", help="Keep draining as producers spool (until interrupted)."),
        fmt: Format = typer.Option(Format.table, "--format", help="table or json."),
    ) -> None:
        """Send spooled events to Kafka, in order, and forget them once Kafka acknowledged them.

        Producers drain by themselves when Kafka answers again; this is for a spool left behind by
        processes that ended during an outage (e.g. agent hooks). Safe to run next to producers: one
        drainer at a time holds the spool's lock.

        Example:  AGENTLEDGER_BOOTSTRAP_SERVERS=127.0.0.1:9092 agentledger spool drain
        """
        from agentledger.producers.sinks import ProducerOptions, spool_dir
        from agentledger.producers.spool import Spool, drain
        from agentledger.schemas.errors import ConfigError
        from agentledger.schemas.transport.kafka import KafkaSink

        s = settings(ctx)
        if not s.uses_kafka:
            raise ConfigError("spool drain needs Kafka: set AGENTLEDGER_BOOTSTRAP_SERVERS or --bootstrap-servers")
        spool = Spool(spool_dir(s, ProducerOptions.from_env()))
        total = {"drained": 0, "remaining": spool.undrained()}
        while True:
            r = drain(spool, lambda: KafkaSink(s.bootstrap_servers, default_partitions=s.partitions),
                      timeout_s=timeout)
            total = {"drained": total["drained"] + r["drained"], "remaining": r["remaining"]}
            if not follow:
                break
            time.sleep(1.0)
        if fmt is Format.json:
            print_json(total)
        else:
            console.print(f"drained {total['drained']} events to {s.bootstrap_servers}; {total['remaining']} left")
