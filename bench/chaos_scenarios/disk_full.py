"""Disk full: a recorder writes sessions to the embedded log while its disk fills up (a real tmpfs
when the runner is root, else injected ENOSPC), writes come back short or fail (ENOSPC, EIO), a
producer dies mid-write, and space returns; then everything is ingested. See bench/chaos_disk.py
for the runs and the figures; ``undetected`` (must be 0) sums what the durability protocol let
through: acknowledged events lost or duplicated, events reported not durable that appeared anyway,
partitions left unusable, sessions the warehouse calls broken."""

from __future__ import annotations

from chaos_scenarios import scenario


@scenario("disk_full")
def run(args, workdir):
    import chaos_disk  # bench/ (the runner puts it on sys.path)

    return chaos_disk.run(args.seed, args.disk_runs, workdir=workdir)
