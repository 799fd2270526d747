"""The agentledger core: the Avro event contract and the code every stage shares.

`producers`, `consumers` and `replay` import this package and never each other
(tests/test_layering.py enforces it). Submodules are imported lazily by their users
so that short-lived processes (agent hooks) only pay for what they touch.
"""

SCHEMA_NAMESPACE = "dev.agentledger"
