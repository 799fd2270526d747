"""The sink producers write through. One factory, so that every producer (recorder, simulator,
importers, hooks, sandbox) gets the same durability behaviour.

Today: the transport's own sink (Kafka, or the local log). The producers issue (spooling) replaces
the body with a sink that never blocks the agent longer than a bound and spools to the local log
while Kafka is slow or down.
"""

from __future__ import annotations

from schemas.config import Settings
from schemas.transport import open_sink
from schemas.transport.base import Sink


def open_producer_sink(settings: Settings, **options) -> Sink:
    return open_sink(settings, **options)
