"""The training data: a seeded global order read by byte range, the same whatever the loader's layout."""

import hashlib
import io
import random
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from manifests.schema import tar_members
from training.data import (DataConfig, StepBatches, TrainingSet, UnreadableData, augment_with_record, collate,
                           keys_digest, loader, shard_urls)
from training.shards import SampleIndex, ShardReader

pytestmark = pytest.mark.slow  # needs the pipeline's tiny dataset

CFG = DataConfig(resolution=32)


def rewrite(path, change):
    """Rewrites a tar with ``change(name, data) -> data`` applied to each member (sizes may change)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            data = change(info.name, data)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_every_member_read_by_range_is_the_tars_own(tiny_dataset):
    """Offsets computed from the manifests alone give each member's bytes exactly, for every sample."""
    index = SampleIndex.from_store(str(tiny_dataset))
    assert len(index) == 48 and index.identity["shards"] == 3 and index.identity["samples"] == 48
    got = ShardReader(index).read([(i, index.layouts[index.layout[i]]) for i in range(len(index))])
    tars = {}
    for url in index.urls:
        with open(url, "rb") as f:
            tars.update(tar_members(f.read()))
    assert [s["__key__"] for s in got] == list(index.keys)
    for sample in got:
        assert {k: v for k, v in sample.items() if k != "__key__"} == tars[sample["__key__"]]


def test_a_shard_that_does_not_match_its_manifest_is_read_through_its_own_headers(tiny_dataset, tmp_path):
    """Repacked with other member sizes (and PAX headers): the offsets are wrong, the headers say so, and the
    samples are found by the shard's own headers instead, none lost."""
    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    path = ds / "shards" / "shard-000001.tar"
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            data = data + b" " * 700 if name.endswith(".txt") else data
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), {"comment": "repacked"}
            tar.addfile(info, io.BytesIO(data))
    index = SampleIndex.from_store(str(ds))
    reader = ShardReader(index)
    got = reader.read([(i, ("txt", "json")) for i in range(len(index))])
    assert all(isinstance(s, dict) for s in got)
    assert [int(index.shard[i]) for i in range(len(index)) if got[i]["txt"].endswith(b" " * 700)] == [1] * 16
    assert set(reader._scanned) == {1}  # scanned once, the other shards read by their manifests


def test_the_order_is_a_seeded_permutation_of_every_sample_per_epoch(tiny_dataset):
    index = SampleIndex.from_store(str(tiny_dataset))
    n = len(index)
    order = lambda seed, epoch: [TrainingSet(index, CFG, seed).sample_at(epoch * n + p) for p in range(n)]
    first = order(7, 0)
    assert sorted(first) == list(range(n)) and first != list(range(n))
    assert first == order(7, 0) and sorted(order(7, 1)) == list(range(n)) and order(7, 1) != first
    assert order(8, 0) != first


def step_view(index, cfg, world, micro, workers, steps=4, global_batch=8, seed=3):
    """[(position, key, skipped, sha256 of the tensors)] of each step, every rank's share in rank order."""
    per_step = [[] for _ in range(steps)]
    for rank in range(world):
        batches = StepBatches(start=8, steps=steps, global_batch=global_batch, world=world, rank=rank,
                              micro_batch=micro)
        for n, batch in enumerate(loader(index, cfg, seed, batches, workers)):
            step = n // (global_batch // (world * micro))
            for j, key in enumerate(batch["key"]):
                digest = hashlib.sha256(batch["reference"][j].numpy().tobytes() + batch["target"][j].numpy().tobytes())
                per_step[step].append((batch["position"][j], key, digest.hexdigest()))
            per_step[step].append(("skipped", batch["skipped"]))
    return [sorted(rows, key=str) for rows in per_step]


def test_what_a_step_sees_does_not_depend_on_workers_micro_batch_or_ranks(tiny_dataset, tmp_path):
    """Steps 1-4 (positions 8-39) through 0, 1 and 2 loader workers, micro-batches of 1, 2 and 4, one rank or
    two: the same positions, keys, augmented tensors and skipped counts, over a dataset with corrupt samples
    (replacement draws included)."""
    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    index = SampleIndex.from_store(str(ds))
    order = TrainingSet(index, CFG, 3)
    bad = {str(index.keys[order.sample_at(p)]) for p in (9, 20, 33)}  # corrupt where steps 1-4 read
    for s in range(3):
        rewrite(ds / "shards" / f"shard-00000{s}.tar",
                lambda name, data: b"\0" * len(data) if name.split(".")[0] in bad and name.endswith(".jpg") else data)
    want = step_view(index, CFG, world=1, micro=8, workers=0)
    assert [[r for r in rows if r[0] == "skipped"] for rows in want] != [[("skipped", 0)]] * 4  # replacements drawn
    assert all(len([r for r in rows if r[0] != "skipped"]) == 8 for rows in want)  # the batch keeps its size
    assert not bad & {r[1] for rows in want for r in rows}
    for world, micro, workers in ((1, 1, 2), (1, 4, 1), (2, 2, 0), (2, 1, 2)):
        got = step_view(index, CFG, world=world, micro=micro, workers=workers)
        # skipped counts are per micro-batch: compare their sums per step
        total = lambda rows: sum(r[1] for r in rows if r[0] == "skipped")
        assert [total(r) for r in got] == [total(r) for r in want], (world, micro, workers)
        strip = lambda rows: [r for r in rows if r[0] != "skipped"]
        assert [strip(r) for r in got] == [strip(r) for r in want], (world, micro, workers)


def test_step_batches_give_each_rank_its_contiguous_share():
    two = [list(StepBatches(start=4, steps=2, global_batch=4, world=2, rank=r, micro_batch=1)) for r in (0, 1)]
    assert two == [[[4], [5], [8], [9]], [[6], [7], [10], [11]]]
    assert list(StepBatches(start=0, steps=1, global_batch=4, world=1, rank=0, micro_batch=4)) == [[0, 1, 2, 3]]
    assert len(StepBatches(start=0, steps=3, global_batch=8, world=2, rank=1, micro_batch=2)) == 6
    with pytest.raises(ValueError, match="not a multiple"):
        StepBatches(start=0, steps=1, global_batch=6, world=2, rank=0, micro_batch=2)


def test_the_keys_digest_does_not_depend_on_the_grouping():
    positions, keys = list(range(10)), [f"k{i % 4}" for i in range(10)]
    whole = keys_digest(positions, keys)
    assert (keys_digest(positions[:3], keys[:3]) + keys_digest(positions[3:], keys[3:])) % 2**48 == whole
    assert keys_digest(positions, keys[::-1]) != whole and keys_digest([p + 1 for p in positions], keys) != whole


def test_batches_are_tensors_in_the_vae_range(tiny_dataset):
    batch = collate(TrainingSet(SampleIndex.from_store(str(tiny_dataset)), CFG, 0).__getitems__([0, 1, 2, 3]))
    assert batch["target"].shape == batch["reference"].shape == (4, 3, 32, 32)
    assert batch["target"].min() >= -1 and batch["target"].max() <= 1
    assert all(isinstance(c, str) and c for c in batch["caption"]) and batch["position"] == [0, 1, 2, 3]


def test_only_committed_shards_are_read(tiny_dataset, tmp_path):
    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    shutil.copy(ds / "shards" / "shard-000000.tar", ds / "shards" / "shard-000009.tar")  # no manifest
    assert [u.rsplit("/", 1)[1] for u in shard_urls(str(ds))] == [f"shard-00000{i}.tar" for i in range(3)]
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        shard_urls(str(tmp_path / "nothing"))


def test_the_dataset_identity_is_its_committed_shards_wherever_they_are(tiny_dataset, tmp_path):
    import json

    same = SampleIndex.from_store(str(shutil.copytree(tiny_dataset, tmp_path / "copy"))).identity
    assert same == SampleIndex.from_store(str(tiny_dataset)).identity
    fewer = shutil.copytree(tiny_dataset, tmp_path / "fewer")
    (fewer / "manifests" / "shard-000002.json").unlink()
    assert SampleIndex.from_store(str(fewer)).identity["shards"] == 2
    other = shutil.copytree(tiny_dataset, tmp_path / "other")
    manifest = json.loads((other / "manifests" / "shard-000001.json").read_text())
    manifest["sha256"] = "0" * 64  # a shard rewritten (and recommitted) with the same count
    (other / "manifests" / "shard-000001.json").write_text(json.dumps(manifest))
    changed = SampleIndex.from_store(str(other)).identity
    assert changed["samples"] == same["samples"] and changed["sha256"] != same["sha256"]


def test_corrupt_samples_are_replaced_and_counted_and_shards_cut_short_keep_their_head(tiny_dataset, tmp_path):
    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    index = SampleIndex.from_store(str(ds))
    bad = str(index.keys[3])  # in shard 0
    rewrite(ds / "shards" / "shard-000000.tar",
            lambda name, data: b"not a jpeg" if name == f"{bad}.target.jpg" else data)
    cut = ds / "shards" / "shard-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3] + b"\x00garbage" * 500)
    samples = TrainingSet(index, CFG, 3).__getitems__(list(range(2 * len(index))))  # two epochs: every sample twice
    keys = [s["key"] for s in samples]
    assert bad not in keys
    head = {str(index.keys[i]) for i in range(16, 32)} & set(keys)  # shard 1: what precedes the cut still reads
    assert 2 <= len(head) < 16
    assert {str(index.keys[i]) for i in range(len(index)) if index.shard[i] != 1 and index.keys[i] != bad} <= set(keys)
    unreadable = {bad} | {str(index.keys[i]) for i in range(16, 32)} - head
    order = TrainingSet(index, CFG, 3)
    primary = [str(index.keys[order.sample_at(p)]) for p in range(len(samples))]
    # A position is replaced exactly when its own sample cannot be read, and counts at least that failure.
    assert [p for p, s in enumerate(samples) if s["skipped"]] == [p for p, k in enumerate(primary) if k in unreadable]
    kept = [k for k in primary if k not in unreadable]
    assert [s["key"] for s, k in zip(samples, primary) if k not in unreadable] == kept
    again = TrainingSet(index, CFG, 3).__getitems__(list(range(2 * len(index))))
    assert [s["key"] for s in again] == keys and all(torch.equal(a["reference"], b["reference"]) for a, b in
                                                      zip(samples, again))


def test_a_dataset_none_of_whose_samples_can_be_read_stops_with_the_shards(tiny_dataset, tmp_path):
    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    for tar in (ds / "shards").glob("*.tar"):
        tar.write_bytes(b"\x00" * 1024)  # not a tar any more
    index = SampleIndex.from_store(str(ds))
    with pytest.raises(UnreadableData, match=r"6 samples in a row could not be read, drawn from \d shards "
                                             r"\(shard-00000\d"):
        TrainingSet(index, DataConfig(resolution=32, max_unreadable=6), 0)[0]
    (ds / "shards" / "shard-000001.tar").write_bytes((tiny_dataset / "shards" / "shard-000001.tar").read_bytes())
    one_of_three = DataConfig(resolution=32, max_unreadable=30)  # (2/3)^30: never 30 misses in a row
    assert {s["key"] for s in TrainingSet(index, one_of_three, 0).__getitems__(list(range(48)))} <= {
        str(index.keys[i]) for i in range(16, 32)}


def s3_error(errno_: int, code: str) -> OSError:
    """What s3fs raises for an S3 error response: an OSError whose cause carries the response's code."""
    e = OSError(errno_, code)
    e.__cause__ = type("ClientError", (Exception,), {"response": {"Error": {"Code": code}}})()
    return e


class Flaky:
    """A filesystem whose reads fail as an object store's do under load: ``fails`` failures in a row of every
    other range of each read (an OSError, a client library's own error, a 400 that s3fs gives EINVAL, as it does
    a 416), then the real bytes; or, with ``error``, that error for every range."""

    def __init__(self, fs, fails: int, error: Exception | None = None):
        self.fs, self.fails, self.calls, self.error = fs, fails, 0, error

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def cat_ranges(self, paths, starts, ends, on_error="return"):
        import errno

        import aiohttp

        got = self.fs.cat_ranges(paths, starts, ends, on_error=on_error)
        self.calls += 1
        if self.error is not None:
            return [self.error] * len(got)
        if self.calls > self.fails:
            return got
        errors = (OSError(errno.EIO, "503 Slow Down"), aiohttp.ClientPayloadError("Response payload is not completed"),
                  s3_error(errno.EINVAL, "IncompleteBody"))
        return [errors[j // 2 % 3] if j % 2 == 0 else g for j, g in enumerate(got)]


def test_reads_that_fail_are_retried_and_never_taken_for_bad_data(tiny_dataset, tmp_path, monkeypatch):
    """A 503, a reset connection or a 400 is the store's: retried with backoff, the samples the run's seed gives,
    nothing skipped; a store that keeps failing stops the run (it resumes later) instead of dropping samples.
    A shard that is gone is the data's: its samples are skipped, without a retry."""
    import errno

    import training.shards as shards

    slept = []
    monkeypatch.setattr(shards.time, "sleep", slept.append)
    index = SampleIndex.from_store(str(tiny_dataset))
    positions = list(range(12))
    clean = TrainingSet(index, CFG, 5).__getitems__(positions)
    flaky = TrainingSet(index, CFG, 5)
    flaky._reader = ShardReader(index)
    flaky._reader.fs = Flaky(flaky._reader.fs, fails=2)
    got = flaky.__getitems__(positions)
    assert [s["key"] for s in got] == [s["key"] for s in clean] and all(s["skipped"] == 0 for s in got)
    assert all(torch.equal(a["target"], b["target"]) for a, b in zip(got, clean))
    assert slept == list(shards.RETRY_DELAYS[:2])
    slept.clear()
    down = TrainingSet(index, CFG, 5)
    down._reader = ShardReader(index)
    down._reader.fs = Flaky(down._reader.fs, fails=10**9)
    with pytest.raises(shards.StoreUnavailable, match=r"still failing after 5 retries over 31 s .*resume"):
        down.__getitems__(positions)
    assert slept == list(shards.RETRY_DELAYS)
    slept.clear()
    broken = TrainingSet(index, CFG, 5)
    broken._reader = ShardReader(index)
    broken._reader.fs = Flaky(broken._reader.fs, fails=0, error=TypeError("a bug"))
    with pytest.raises(TypeError, match="a bug"):  # not the store's: raised at once, neither retried nor skipped
        broken.__getitems__(positions)
    beyond = TrainingSet(index, CFG, 5)
    beyond._reader = ShardReader(index)
    beyond._reader.fs = Flaky(beyond._reader.fs, fails=0, error=s3_error(errno.EINVAL, "InvalidRange"))
    with pytest.raises(UnreadableData):  # a 416: the data's (a shard shorter than its manifest), skipped
        beyond.__getitems__(positions)
    assert slept == []
    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    (ds / "shards" / "shard-000000.tar").unlink()
    gone = SampleIndex.from_store(str(ds))
    samples = TrainingSet(gone, CFG, 5).__getitems__(positions)
    assert all(gone.shard[gone.keys.tolist().index(s["key"])] != 0 for s in samples) and slept == []
    assert any(s["skipped"] for s in samples)


def test_reference_augmentation_follows_the_official_recipe():
    """2,000 draws: the subject's longer side uniform in 0.70-1.00 of the canvas at a random position, erasing
    (2-25% of the image, white) at p 0.4, colour jitter at p 0.1, flips at p 0.5."""
    ref = np.full((64, 64, 3), 255, np.uint8)
    ref[16:48, 20:44] = (200, 30, 30)  # a 32x24 red subject with a white margin
    rng, n = random.Random(0), 2000
    counts = {"erase": 0, "jitter": 0, "flip": 0}
    sides, corners = [], set()
    for _ in range(n):
        image, record = augment_with_record(Image.fromarray(ref), rng, DataConfig())
        out = np.asarray(image)
        assert out.shape == ref.shape
        counts["erase"] += record["erase"] is not None
        counts["jitter"] += record["jitter"]
        counts["flip"] += record["flip"]
        sides.append(record["side"])
        if record["erase"] is not None:
            x0, y0, x1, y1 = record["erase"]
            assert (out[y0:y1, x0:x1] == 255).all() and 0.019 <= (x1 - x0) * (y1 - y0) / 64 ** 2 <= 0.26
        elif not record["jitter"]:  # untouched by erasing and jitter: the subject alone on white, at its size
            ys, xs = np.nonzero((out < 250).any(-1))
            assert abs(max(np.ptp(ys), np.ptp(xs)) + 1 - record["side"] * 64) <= 2
            assert abs((np.ptp(xs) + 1) / (np.ptp(ys) + 1) - 24 / 32) < 0.1  # aspect kept
            corners.add((xs.min(), ys.min()))
    assert 0.7 <= min(sides) < 0.72 and 0.98 < max(sides) <= 1.0
    assert len(corners) > 100  # pasted anywhere, not centred
    for name, p in (("erase", 0.4), ("jitter", 0.1), ("flip", 0.5)):
        assert abs(counts[name] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, (name, counts[name])


def test_a_large_jpeg_target_decodes_at_reduced_scale_close_to_a_full_decode():
    """1024 px JPEG -> 512 px tensor: decoded at half scale by libjpeg, within a few levels of decoding it
    whole and resizing (smooth content; the draft path averages 2x2 blocks, the bicubic resize filters)."""
    import io

    from dreamcache.images import to_tensor
    from training.data import decode_target

    yy, xx = np.mgrid[0:1024, 0:1024]
    img = np.stack([xx / 4, yy / 4, (xx + yy) / 8], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    fast = decode_target(buf.getvalue(), 512)
    assert fast.size == (512, 512)  # already at the training size: no resize left to do
    full = to_tensor(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), 512)
    assert (to_tensor(fast, 512) - full).abs().mean() < 2 / 127.5  # under 2 levels of 255 on average
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    assert decode_target(png.getvalue(), 512).size == (1024, 1024)  # other formats decode whole


def test_loader_workers_default_to_the_ranks_share_of_the_cores(monkeypatch):
    import os

    from training.data import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(None) == 11  # 12 cores per rank, one for the rank itself
    assert loader_workers(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(None) == 16  # capped
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert loader_workers(None) == 0  # one core: load in the rank's own process
