"""The JSON serialisations whose bytes are hashed or signed: one function per form, used by every
digest of that form. Their bytes are frozen: a change would break every digest and signature already
recorded with them (tests/test_canonical.py pins them).

`canonical_json` -- sorted keys, no spaces, non-ASCII as ``\\uXXXX``:
    sandbox tree manifests and environment digests (producers/sandbox), the JSON values of a bundle's
    header that its header digest and the operator's signature cover (replay/bundle.py), signed tree
    heads as published (schemas/treelog.py).
`canonical_json_utf8` -- sorted keys, no spaces, UTF-8, no NaN/Infinity:
    the replayed session state digest (replay/projection.py).
`canonical_json_spaced` -- sorted keys, Python's default ", " and ": " separators, non-ASCII escaped:
    the digests of a detection rule and of an anomaly model (consumers/detect), recorded with every
    alert and score.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def canonical_json_utf8(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def canonical_json_spaced(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()
