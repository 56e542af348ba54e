"""The commit protocol on any fsspec filesystem: tmp -> rename -> manifest, and recovery from every state."""

import io
import json
import tarfile
from pathlib import Path

import pytest

from manifests.index import Index
from manifests.schema import Manifest, read_manifests
from dreamcache.store import Store
from pipeline.writer import ShardWriter, recover


def row(i, status="ok"):
    return {"key": f"s0-{i:08d}", "index": i, "caption": f"a dog {i}", "subject": "dog", "category": "dog",
            "seed": i, "status": status, "error": "" if status == "ok" else "detail", "det_score": 0.5,
            "sam_score": 0.9, "mask_area": 0.2, "box": "1,2,3,4", "crop": "0,0,8,8",
            "target": b"T" * 10, "reference": b"R" * 5, "mask": b"M" * 3}


def writer(store, size=5, shard_size=2, start_shard=0, start=0, index=None):
    return ShardWriter(store, index or Index({}, {}), size, shard_size, "png", {"generation": {"steps": 4}},
                       next_shard=start_shard, next_candidate=start)


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "ds"))
    if request.param == "s3":  # an object store: shards staged locally, uploaded to their final keys
        bucket, _ = request.getfixturevalue("s3_bucket")
        return Store(f"{bucket}/ds")
    import fsspec

    fsspec.filesystem("memory").store.clear()
    return Store(f"memory://ds-{tmp_path.name}")


def test_shards_manifests_and_index_agree(store):
    w = writer(store)
    for i in range(8):
        w.add(row(i, "ok" if i not in (1, 4) else "segment:no_box"))
    assert w.done and w.written == 5
    ms = read_manifests(store)
    assert [m.count for m in ms] == [2, 2, 1]
    assert [m.candidates for m in ms] == [(0, 3), (3, 6), (6, 7)]
    assert [d.index for m in ms for d in m.drops] == [1, 4]
    index = json.loads(store.read_bytes("dataset.json"))
    assert index["totals"]["samples"] == sum(m.count for m in ms) == 5
    assert index["drops"] == {"segment": {"no_box": 2}}
    for m in ms:
        data = store.read_bytes("shards", m.shard)
        assert len(data) == m.bytes
        import hashlib

        assert hashlib.sha256(data).hexdigest() == m.sha256
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
        assert len(names) == 5 * m.count
        assert {n.split(".", 1)[1] for n in names} == {"txt", "json", "target.jpg", "reference.png", "mask.png"}


def test_tars_are_deterministic(tmp_path):
    shas = []
    for name in ("a", "b"):
        w = writer(Store(str(tmp_path / name)), size=2)
        w.add(row(0)), w.add(row(1))
        shas.append(read_manifests(w.store)[0].sha256)
    assert shas[0] == shas[1]


def test_recover_discards_temporaries_and_uncommitted_tars(store):
    w = writer(store, size=4)
    for i in range(2):
        w.add(row(i))  # shard 0 sealed
    w.flush()  # and committed
    w.add(row(2))  # shard 1 half written, in a temporary file
    assert any(".tmp-" in n for n in store.list("shards")) != store.object_store  # S3: staged on local disk
    store.write_atomic(store.read_bytes("shards", "shard-000000.tar"), "shards", "shard-000005.tar")  # an orphan
    manifests = recover(store)
    assert [m.shard for m in manifests] == ["shard-000000.tar"]
    assert store.list("shards") == ["shard-000000.tar"]
    w.abort()  # the "killed" writer: nothing of it may reappear
    assert store.list("shards") == ["shard-000000.tar"]


def test_resume_continues_after_the_last_commit(store):
    w = writer(store, size=4)
    for i in range(3):
        w.add(row(i))
    w.flush()
    w.abort()  # "killed" with shard 1 open
    manifests = recover(store)
    index = Index({}, {})
    for m in manifests:
        index.add(m)
    w2 = writer(store, size=4, start_shard=len(manifests), start=manifests[-1].candidates[1], index=index)
    for i in range(manifests[-1].candidates[1], 6):
        w2.add(row(i))
    keys = [s.key for m in read_manifests(store) for s in m.samples]
    assert keys == [f"s0-{i:08d}" for i in range(4)]


def test_rows_out_of_order_are_refused(store):
    w = writer(store)
    w.add(row(0))
    with pytest.raises(AssertionError, match="plan order"):
        w.add(row(2))
    w.abort()
    assert not any(".tmp-" in n for n in store.list("shards"))


def test_recover_refuses_a_gap(store):
    w = writer(store, size=6)
    for i in range(6):
        w.add(row(i))
    store.remove("manifests", "shard-000001.json")
    with pytest.raises(RuntimeError, match="not contiguous"):
        recover(store)


def test_manifest_roundtrip_and_format_check():
    m = Manifest("shard-000000.tar", "ab", 10, 0, (0, 3), [], [])
    assert Manifest.from_json(m.to_json()) == m
    with pytest.raises(ValueError, match="format"):
        Manifest.from_json(json.dumps({**json.loads(m.to_json()), "format": "other/9"}))


def test_on_an_object_store_tars_go_to_their_final_keys_with_no_copy(s3_bucket, monkeypatch):
    """S3 has no rename: a copy of a whole tar plus a delete would double the bytes moved. Each tar is staged on
    local disk and uploaded to its final key; nothing is copied, moved or deleted."""
    store = Store(f"{s3_bucket[0]}/ds")
    for name in ("mv", "copy", "cp_file", "rm", "rm_file"):
        monkeypatch.setattr(store.fs, name, lambda *a, **k: pytest.fail(f"the writer called {name}"))
    w = writer(store, size=5)
    for i in range(6):
        w.add(row(i))
    w.close()
    assert [m.count for m in read_manifests(store)] == [2, 2, 1]
    assert store.list("shards") == [f"shard-00000{i}.tar" for i in range(3)]
    assert not w._spool.exists()  # the staged tars are gone


def test_a_failed_upload_stops_the_writer_and_commits_nothing_after_it(s3_bucket, monkeypatch):
    store = Store(f"{s3_bucket[0]}/ds")
    real = store.upload

    def flaky(local, *parts):
        if parts[-1] == "shard-000001.tar":
            raise OSError("connection reset by peer")
        real(local, *parts)

    monkeypatch.setattr(store, "upload", flaky)
    w = writer(store, size=8)
    with pytest.raises(OSError, match="connection reset"):
        for i in range(8):
            w.add(row(i))
        w.commit(final=True)
    w.abort()
    assert [m.shard for m in read_manifests(store)] == ["shard-000000.tar"]  # shard 1 failed, 2 was not published
    assert store.list("shards") == ["shard-000000.tar"] and store.list("manifests") == ["shard-000000.json"]
    assert [m.shard for m in recover(store)] == ["shard-000000.tar"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    from dreamcache.store import atomic_folder

    final = tmp_path / "checkpoints" / "step-2"
    with pytest.raises(RuntimeError):
        with atomic_folder(final, only_writer=True) as folder:
            (Path(folder) / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed mid-write")
    assert not final.exists() and not list((tmp_path / "checkpoints").iterdir())  # nothing, not even the temporary
    (tmp_path / "checkpoints" / ".step-2.tmp-deadbeef").mkdir()  # what a SIGKILL leaves
    with atomic_folder(final, only_writer=True) as folder:
        (Path(folder) / "a.bin").write_bytes(b"new")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]
    assert (final / "a.bin").read_bytes() == b"new"
    with atomic_folder(final) as folder:  # replaces the previous folder whole
        (Path(folder) / "b.bin").write_bytes(b"newer")
    assert sorted(p.name for p in final.iterdir()) == ["b.bin"]


def test_a_shard_handed_to_the_publisher_survives_an_interrupt_right_after(store):
    """Ctrl-C (or any interrupt) lands just after shard 1 was handed to the publisher, whose publication has
    started. The staging file is the publisher's from that moment: abort() leaves it, the publication under way
    completes, and every manifest has its tar. The publisher is held at the start of that publication until
    abort() hands back (events, no sleeps), so the interleaving is the same on any machine."""
    import threading

    w = writer(store, size=4)
    w.add(row(0)), w.add(row(1))
    w.flush()  # shard 0 committed
    publisher, started, gate = w._publisher, threading.Event(), threading.Event()
    submit, close = publisher.submit, publisher.close

    def handed_over_then_interrupted(publish, discard):
        def held():
            started.set()
            gate.wait()
            publish()

        submit(held, discard)
        started.wait()  # the publisher has taken the shard
        raise KeyboardInterrupt

    def close_releasing_the_publisher(cancel=False):
        gate.set()
        close(cancel)

    publisher.submit, publisher.close = handed_over_then_interrupted, close_releasing_the_publisher
    w.add(row(2))
    with pytest.raises(KeyboardInterrupt):
        w.add(row(3))  # seals shard 1
    w.abort()
    assert [m.shard for m in recover(store)] == ["shard-000000.tar", "shard-000001.tar"]  # sizes checked too
    assert store.list("shards") == ["shard-000000.tar", "shard-000001.tar"]


@pytest.mark.parametrize("when", ["before the tar", "between the tar and its manifest"])
def test_a_run_that_lost_its_lock_publishes_nothing_more(store, monkeypatch, when):
    """Another run takes the lock over (--break-lock) while shard 1 is being published. The publisher reads the
    lock afresh before the tar and before the manifest: the old run places no tar over the new owner's and
    commits no manifest; shard 0's manifest records the run that committed it."""
    from manifests.lock import LOCK, FolderInUse, RunLock

    if store.local:
        store.fs.makedirs(store.root, exist_ok=True)
    lock = RunLock(store).__enter__()
    other = RunLock(store, force=True)
    w = ShardWriter(store, Index({}, {}), 4, 2, "png", {}, next_shard=0, next_candidate=0, check=lock.check,
                    run=lock.id)
    w.add(row(0)), w.add(row(1))
    w.flush()
    if when == "before the tar":
        submit = w._publisher.submit
        monkeypatch.setattr(w._publisher, "submit", lambda publish, discard: submit(
            lambda: (other.__enter__(), publish()), discard))
    elif store.object_store:
        upload = store.upload

        def upload_then_taken(local, *parts):
            upload(local, *parts)
            other.__enter__()

        monkeypatch.setattr(store, "upload", upload_then_taken)
    else:
        mv = store.fs.mv

        def renamed_then_taken(src, dst, **kw):
            mv(src, dst, **kw)
            if dst.endswith("shard-000001.tar"):
                other.__enter__()

        monkeypatch.setattr(store.fs, "mv", renamed_then_taken)
    w.add(row(2))
    with pytest.raises(FolderInUse, match="took the lock"):
        w.add(row(3))
        w.commit(final=True)
    w.abort()
    assert store.list("manifests") == ["shard-000000.json"]
    assert read_manifests(store)[0].run == lock.id
    placed = "shard-000001.tar" in store.list("shards")
    assert placed == (when != "before the tar")  # between: an uncommitted tar, which the new owner discards
    assert json.loads(store.read_bytes(LOCK))["run"] == other.id
    other.__exit__(None, None, None)
    lock.__exit__(None, None, None)


def test_manifests_from_before_the_run_id_still_read():
    m = Manifest("shard-000000.tar", "ab", 10, 0, (0, 3), [], [], run="3f2a")
    assert Manifest.from_json(m.to_json()).run == "3f2a"
    old = json.loads(m.to_json())
    del old["run"]
    assert Manifest.from_json(json.dumps(old)).run is None


def test_renames_and_links_on_a_local_disk_are_followed_by_a_folder_fsync(tmp_path, monkeypatch):
    """POSIX makes a rename (or link) durable only once its folder is fsynced. Every folder fsync is recorded
    with the folder's listing at that moment: the new name must be in it."""
    import os
    import stat

    from dreamcache.store import atomic_folder

    synced, fsync = [], os.fsync

    def recording(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            folder = os.readlink(f"/proc/self/fd/{fd}")
            synced.append((folder, sorted(os.listdir(folder))))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    store = Store(str(tmp_path / "ds"))
    store.write_atomic(b"{}", "manifests", "shard-000000.json")  # open_atomic: temporary file, rename
    assert (str(tmp_path / "ds" / "manifests"), ["shard-000000.json"]) in synced
    synced.clear()
    assert store.create_exclusive(b"{}", "lock.json")  # the lock: a hard link
    assert (str(tmp_path / "ds"), ["lock.json", "manifests"]) in synced
    synced.clear()
    with atomic_folder(tmp_path / "checkpoints" / "step-2") as folder:
        os.makedirs(os.path.join(folder, "model"))
        with open(os.path.join(folder, "model", "weights.bin"), "wb") as f:
            f.write(b"w")
    assert (str(tmp_path / "checkpoints"), ["step-2"]) in synced  # after the rename
    assert any(path.endswith("/model") and files == ["weights.bin"] for path, files in synced)  # before it
