"""Transports: one interface (`base.Sink`, `base.Source`), implemented by the embedded local log,
Kafka (the `kafka` adapter package) and memory (tests, staging).

Stages only see `Sink` and `Source`; `open_sink` / `open_source` pick the implementation from the
settings (Kafka when bootstrap servers are configured), `kafka_*` / `local_*` open one explicitly.
tests/test_transport_contract.py runs one contract over every implementation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import ConfigError
from .base import MemorySink, MemorySource, Message, Outgoing, Scan, Sink, Source

LIBRARY_LOGGERS = ("kafka",)  # the client libraries' loggers (kafka-python), without importing them


def quiet_library_logs(verbose: bool) -> None:
    """The client libraries log every failed connection attempt (kafka-python: one ERROR and one
    WARNING per retry): a command reports the failure in one line, so their logs show only when
    asked for (``--verbose``)."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.CRITICAL + 1)


def _bootstrap_servers(settings: Settings) -> str:
    """The bootstrap servers of settings that use Kafka (`Settings.uses_kafka`: they are set)."""
    if not settings.bootstrap_servers:
        raise ConfigError("the Kafka transport needs AGENTLEDGER_BOOTSTRAP_SERVERS")
    return settings.bootstrap_servers


def open_sink(settings: Settings, **kafka_options: Any) -> Sink:
    if settings.uses_kafka:
        return kafka_sink(_bootstrap_servers(settings), default_partitions=settings.partitions, **kafka_options)
    return local_sink(settings.log_dir, default_partitions=settings.partitions)


def open_source(settings: Settings, **kafka_options: Any) -> Source:
    if settings.uses_kafka:
        return kafka_source(_bootstrap_servers(settings), **kafka_options)
    return local_source(settings.log_dir, default_partitions=settings.partitions)


def kafka_sink(bootstrap_servers: str, default_partitions: int = 6, *, process: bool = False, **options: Any) -> Sink:
    """The Kafka producer (``process``: its client in a child process, for bulk producers)."""
    from .kafka import KafkaProcessSink, KafkaSink

    cls = KafkaProcessSink if process else KafkaSink
    return cls(bootstrap_servers, default_partitions=default_partitions, **options)


def kafka_source(bootstrap_servers: str, **options: Any) -> Source:
    from .kafka import KafkaSource

    return KafkaSource(bootstrap_servers, **options)


def local_sink(log_dir: str | Path, default_partitions: int = 6) -> Sink:
    from .local import LocalLog, LocalSink

    return LocalSink(LocalLog(log_dir, default_partitions=default_partitions))


def local_source(log_dir: str | Path, default_partitions: int = 6) -> Source:
    """Reads the embedded log at ``log_dir`` (creates nothing until asked to)."""
    from .local import LocalLog, LocalSource

    return LocalSource(LocalLog(log_dir, default_partitions=default_partitions))


__all__ = ["LIBRARY_LOGGERS", "MemorySink", "MemorySource", "Message", "Outgoing", "Scan", "Sink", "Source", "kafka_sink",
           "kafka_source", "local_sink", "local_source", "open_sink", "open_source", "quiet_library_logs"]
