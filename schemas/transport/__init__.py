"""Transports: one interface, two implementations (the embedded local log and Kafka).

Consumers and producers only see `Sink` and `Source`; `open_sink` / `open_source` pick the
implementation from the settings (Kafka when bootstrap servers are configured).
"""

from __future__ import annotations

import logging

from ..config import Settings
from .base import Message, Sink, Source

LIBRARY_LOGGERS = ("kafka",)  # the client libraries' loggers (kafka-python), without importing them


def quiet_library_logs(verbose: bool) -> None:
    """The client libraries log every failed connection attempt (kafka-python: one ERROR and one
    WARNING per retry): a command reports the failure in one line, so their logs show only when
    asked for (``--verbose``)."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.CRITICAL + 1)


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


__all__ = ["LIBRARY_LOGGERS", "Message", "Sink", "Source", "open_sink", "open_source", "quiet_library_logs"]
