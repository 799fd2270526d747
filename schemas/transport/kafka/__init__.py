"""The Kafka adapter: the only package that imports kafka-python (tests/test_layering.py), split by role.

- `clients`: client settings (defaults, SASL/TLS), connection errors, topic creation, the partitioner,
  and factories for kafka-python clients configured as ours (benchmarks' raw baselines use them);
- `sink`: `KafkaSink`, the producer behind `Sink`;
- `process`: `KafkaProcessSink`, the same with the client in a child process (bulk producers);
- `source`: `KafkaSource`, the consumer behind `Source` (polls, consumer groups, scans).

Consumers never commit offsets to Kafka: the warehouse stores them in the same transaction as the
rows (see consumers/ingest/).
"""

from __future__ import annotations

from .clients import (CONNECT_TIMEOUT_MS, CONSUMER_DEFAULTS, PRODUCER_DEFAULTS, connect_config, consumer_client,
                      ensure_topic, partition_for_key, producer_client, security_config, topic_partitions,
                      topic_replication)
from .process import KafkaProcessSink
from .sink import KafkaSink
from .source import KafkaSource

__all__ = ["CONNECT_TIMEOUT_MS", "CONSUMER_DEFAULTS", "PRODUCER_DEFAULTS", "KafkaProcessSink", "KafkaSink",
           "KafkaSource", "connect_config", "consumer_client", "ensure_topic", "partition_for_key", "producer_client",
           "security_config", "topic_partitions", "topic_replication"]
