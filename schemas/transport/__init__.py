"""Transports: one interface, two implementations (the embedded local log and Kafka).

Consumers and producers only see `Sink` and `Source`; `open_sink` / `open_source` pick the
implementation from the settings (Kafka when bootstrap servers are configured).
"""

from __future__ import annotations

from ..config import Settings
from .base import Message, Sink, Source


def open_sink(settings: Settings, **kafka_options) -> Sink:
    if settings.uses_kafka:
        from .kafka import KafkaSink

        return KafkaSink(settings.bootstrap_servers, default_partitions=settings.partitions, **kafka_options)
    from .local import LocalLog, LocalSink

    return LocalSink(LocalLog(settings.log_dir, default_partitions=settings.partitions))


def open_source(settings: Settings, **kafka_options) -> Source:
    if settings.uses_kafka:
        from .kafka import KafkaSource

        return KafkaSource(settings.bootstrap_servers, **kafka_options)
    from .local import LocalLog, LocalSource

    return LocalSource(LocalLog(settings.log_dir, default_partitions=settings.partitions))


__all__ = ["Message", "Sink", "Source", "open_sink", "open_source"]
