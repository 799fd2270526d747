"""The recording store (CAS) and workspace snapshots: integrity, bounds, permissions, restore."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from agentledger.producers.sandbox import tree
from agentledger.producers.sandbox.cas import ContentStore
from agentledger.producers.sandbox.errors import StoreError


def test_blobs_are_content_addressed_private_and_verified(tmp_path):
    s = ContentStore.open(tmp_path / "home", {})
    put = s.put(b"hello")
    assert put.stored and put.digest == hashlib.sha256(b"hello").hexdigest()
    assert s.get(put.digest) == b"hello"
    assert stat.S_IMODE(os.stat(s.root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(s.path(put.digest)).st_mode) == 0o600
    s.path(put.digest).write_bytes(b"hellO")  # tampering
    with pytest.raises(StoreError, match="corrupt"):
        s.get(put.digest)
    with pytest.raises(StoreError, match="not in the recording store"):
        s.get("0" * 64)
    with pytest.raises(StoreError, match="not a sha256"):
        s.get("../../etc/passwd")


def test_bounds_are_enforced_and_reported(tmp_path):
    s = ContentStore.open(tmp_path / "home", {"AGENTLEDGER_CAS_MAX_BLOB_BYTES": "10", "AGENTLEDGER_CAS_MAX_BYTES": "25"})
    assert s.put(b"x" * 11).reason == "blob_too_large"
    assert s.put(b"a" * 10).stored and s.put(b"b" * 10).stored
    full = s.put(b"c" * 10)
    assert not full.stored and full.reason == "store_full" and not s.has(full.digest)
    assert s.put(b"a" * 10).stored, "a blob already present is always 'stored'"
    big = tmp_path / "big"
    big.write_bytes(b"z" * 100)
    res = s.put_file(big)
    assert not res.stored and res.digest == hashlib.sha256(b"z" * 100).hexdigest()
    with pytest.raises(StoreError, match="AGENTLEDGER_CAS_MAX_BYTES"):
        ContentStore.open(tmp_path / "h2", {"AGENTLEDGER_CAS_MAX_BYTES": "lots"})


def test_snapshot_digest_restore_and_apply(tmp_path):
    ws = tmp_path / "ws"
    (ws / "a" / "b").mkdir(parents=True)
    (ws / "a" / "b" / "f.txt").write_text("one")
    (ws / "x.sh").write_text("#!/bin/sh\n")
    os.chmod(ws / "x.sh", 0o755)
    os.symlink("a/b/f.txt", ws / "link")
    (ws / "empty").mkdir()
    (ws / "nä me").write_bytes(b"\x00\x01")
    store = ContentStore.open(tmp_path / "home", {})
    snap = tree.take(str(ws))
    assert tree.store_snapshot(snap, store) == []
    assert set(snap.entries) == {"a", "a/b", "a/b/f.txt", "x.sh", "link", "empty", "nä me"}
    assert snap.entries["link"].digest == "a/b/f.txt" and snap.entries["x.sh"].mode == 0o755
    assert store.get(snap.digest) == snap.canonical
    # mtimes do not matter; content and modes do
    os.utime(ws / "x.sh", (1, 1))
    assert tree.take(str(ws)).digest == snap.digest
    os.chmod(ws / "x.sh", 0o700)
    assert tree.take(str(ws)).digest != snap.digest
    os.chmod(ws / "x.sh", 0o755)

    dest = tmp_path / "restored"
    dest.mkdir()
    assert tree.apply(str(dest), store.get_json(snap.digest)["entries"], store) == []
    assert tree.take(str(dest)).digest == snap.digest

    # move the restored tree to another recorded state: only the delta is applied
    (ws / "a" / "b" / "f.txt").write_text("two")
    os.remove(ws / "nä me")
    (ws / "new").write_text("new")
    snap2 = tree.take(str(ws))
    tree.store_snapshot(snap2, store)
    assert tree.apply(str(dest), snap2.manifest["entries"], store, current=snap.manifest["entries"]) == []
    assert tree.take(str(dest)).digest == snap2.digest
    assert set(tree.changes(snap, snap2)) == {"a/b/f.txt", "nä me", "new"}


def test_the_stat_cache_does_not_hide_changes(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    f = ws / "f"
    f.write_text("aaaa")
    os.utime(f, (1000, 1000))
    cache = tree.StatCache(tmp_path / "cache.json")
    d1 = tree.take(str(ws), cache=cache).digest
    cache.save()
    f.write_text("bbbb")  # same size; new mtime/ctime
    assert tree.take(str(ws), cache=tree.StatCache(tmp_path / "cache.json")).digest != d1


def test_missing_blobs_are_reported_on_restore(tmp_path):
    store = ContentStore.open(tmp_path / "home", {"AGENTLEDGER_CAS_MAX_BLOB_BYTES": "3"})
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "small").write_text("ok")
    (ws / "large").write_text("too large")
    snap = tree.take(str(ws))
    assert tree.store_snapshot(snap, store) == [("large", "blob_too_large")]
    dest = tmp_path / "d"
    dest.mkdir()
    assert tree.apply(str(dest), snap.manifest["entries"], store) == ["large"]
    assert (dest / "small").read_text() == "ok"


def test_forget_deletes_only_what_no_other_session_needs(tmp_path):
    from agentledger.producers.sandbox.cas import forget

    store = ContentStore.open(tmp_path / "home", {})
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "shared").write_text("both sessions saw this")
    (ws / "only-a").write_text("only a")
    snap_a = tree.take(str(ws))
    tree.store_snapshot(snap_a, store)
    (ws / "only-a").unlink()
    snap_b = tree.take(str(ws))
    tree.store_snapshot(snap_b, store)
    env_a = store.put_json({"A": "1"}).digest
    for sid, snap, env in (("a", snap_a, env_a), ("b", snap_b, None)):
        store.save_manifest(sid, {"commands": {"c": {"workspace_before": snap.digest, "env": env}}, "exchanges": {}})
    n, size = forget(store, "a")
    assert n == 3 and size > 0  # a's tree, a's env and the file only a had
    assert store.load_manifest("a") is None
    assert store.has(snap_b.digest) and store.has(snap_b.entries["shared"].digest)
    assert not store.has(snap_a.digest) and not store.has(env_a)


def test_the_stat_cache_does_not_keep_file_names(tmp_path):
    """A workspace file named after a secret: the cache (sandbox state, not the recording store)
    keeps a digest of its path, not the name."""
    ws = tmp_path / "ws"
    ws.mkdir()
    name = "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    f = ws / name
    f.write_text("x")
    st = os.stat(f)
    later = st.st_ctime_ns + 10 * 10**9  # past the racy window: the entry is kept
    cache = tree.StatCache(tmp_path / "cache.json")
    d = cache.digest(str(f), st, later)
    cache.save()
    saved = (tmp_path / "cache.json").read_text()
    assert len(json.loads(saved)) == 1 and name not in saved and name[4:16] not in saved
    f.write_text("y")  # same size; asked with the old stat, only a cache hit gives the old digest
    assert tree.StatCache(tmp_path / "cache.json").digest(str(f), st, later) == d
    assert tree.StatCache(None).digest(str(f), st, later) != d
