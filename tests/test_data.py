"""The training stream over the pipeline's shards: seeded, split per rank, robust to corrupt data."""

import itertools
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (DataConfig, UnreadableData, augment_with_record, collate, make_dataset,
                           shard_urls)

pytestmark = pytest.mark.slow  # needs the pipeline's tiny dataset

CFG = DataConfig(resolution=32, shuffle_buffer=8)


def keys(urls, seed, n=24):
    return [s["key"] for s in itertools.islice(iter(make_dataset(urls, CFG, seed)), n)]


def test_stream_is_seeded_and_split_by_rank(tiny_dataset, monkeypatch):
    urls = shard_urls(str(tiny_dataset))
    assert len(urls) == 3
    a = keys(urls, 7)
    assert a == keys(urls, 7) and a != keys(urls, 8)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert keys(urls, 7) != a  # another rank, another stream from the same seed


def test_batches_are_tensors_in_the_vae_range(tiny_dataset):
    samples = list(itertools.islice(iter(make_dataset(shard_urls(str(tiny_dataset)), CFG, 0)), 4))
    batch = collate(samples)
    assert batch["target"].shape == batch["reference"].shape == (4, 3, 32, 32)
    assert batch["target"].min() >= -1 and batch["target"].max() <= 1
    assert all(isinstance(c, str) and c for c in batch["caption"])


def test_only_committed_shards_are_read(tiny_dataset, tmp_path):
    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    shutil.copy(ds / "shards" / "shard-000000.tar", ds / "shards" / "shard-000009.tar")  # no manifest
    assert [u.rsplit("/", 1)[1] for u in shard_urls(str(ds))] == [f"shard-00000{i}.tar" for i in range(3)]
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        shard_urls(str(tmp_path / "nothing"))


def test_corrupt_shards_and_members_are_skipped_and_counted(tiny_dataset, tmp_path):
    import io
    import tarfile

    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    broken = ds / "shards" / "shard-000001.tar"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 3] + b"\x00garbage" * 500)
    path = ds / "shards" / "shard-000000.tar"
    with tarfile.open(path) as tar:
        members = [(i, tar.extractfile(i).read()) for i in tar.getmembers()]
    bad = next(i.name for i, _ in members if i.name.endswith(".target.jpg")).split(".")[0]
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            data = b"not a jpeg" if info.name == f"{bad}.target.jpg" else data
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(itertools.islice(iter(make_dataset(shard_urls(str(ds)), CFG, 3)), 120))
    assert len(samples) == 120 and bad not in {s["key"] for s in samples}  # endless: it goes past every corrupt shard
    # the bad member, and the truncated shard (a read error, and the sample it cut in half): counted in the stream
    assert sum(s["skipped"] for s in samples) >= 2

    # The counts survive DataLoader workers (each worker's own), so the trainer can add them up.
    loader = torch.utils.data.DataLoader(make_dataset(shard_urls(str(ds)), CFG, 3), batch_size=8, num_workers=2,
                                         collate_fn=collate)
    batches = list(itertools.islice(iter(loader), 30))
    assert sum(b["skipped"] for b in batches) >= 2


def test_a_dataset_none_of_whose_shards_can_be_read_stops_with_their_names(tiny_dataset, tmp_path):
    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    for tar in (ds / "shards").glob("*.tar"):
        tar.write_bytes(b"\x00" * 1024)  # not a tar any more
    cfg = DataConfig(resolution=32, shuffle_buffer=8, max_unreadable=6)
    with pytest.raises(UnreadableData, match=r"6 shards in a row could not be read .*shard-00000\d\.tar"):
        next(iter(make_dataset(shard_urls(str(ds)), cfg, 0)))
    (ds / "shards" / "shard-000001.tar").write_bytes((tiny_dataset / "shards" / "shard-000001.tar").read_bytes())
    one_of_three = DataConfig(resolution=32, shuffle_buffer=8, max_unreadable=30)  # (2/3)^30: never 30 misses in a row
    assert next(iter(make_dataset(shard_urls(str(ds)), one_of_three, 0)))["key"]  # one readable shard is enough




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

    from training.step import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(None) == 11  # 12 cores per rank, one for the rank itself
    assert loader_workers(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(None) == 16  # capped
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert loader_workers(None) == 0  # one core: load in the rank's own process
