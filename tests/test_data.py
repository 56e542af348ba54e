"""The training stream over the pipeline's shards: seeded, split per rank, robust to corrupt data."""

import itertools
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from training.data import SKIPPED, DataConfig, augment_reference, collate, make_dataset, shard_urls

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
    SKIPPED.clear()
    seen = keys(shard_urls(str(ds)), 3, n=120)  # endless stream: it goes on past every corrupt shard
    assert len(seen) == 120 and bad not in seen
    # the bad member, and the sample the truncation cut in half (its members incomplete)
    assert sum(SKIPPED.values()) >= 2, SKIPPED


def test_reference_augmentation_keeps_the_subject_and_the_white():
    ref = np.full((64, 64, 3), 255, np.uint8)
    ref[16:48, 20:44] = (200, 30, 30)  # a 32x24 red subject
    cfg = DataConfig(flip_p=0.5, erase_p=0.0, jitter=0.1)
    rng = random.Random(0)
    for _ in range(20):
        out = np.asarray(augment_reference(Image.fromarray(ref), rng, cfg))
        assert out.shape == ref.shape
        subject = (out < 250).any(-1)
        assert subject.sum() >= 0.7 * 32 * 24 * 0.9  # >= 70% of the area, less a little resampling blur
        assert (out[~subject] >= 250).all()  # the background stays white
