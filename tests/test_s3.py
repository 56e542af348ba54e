"""Training data on an object store: a local S3 API (moto's server mode) read through s3fs, as `--data s3://...`."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow  # needs the pipeline's tiny dataset


@pytest.fixture
def s3(tiny_dataset, s3_bucket):
    """The tiny dataset at s3://BUCKET/ds on the local S3 server; yields (the dataset URL, the environment a
    subprocess needs)."""
    import s3fs

    bucket, env = s3_bucket
    s3fs.S3FileSystem(endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"]).put(str(tiny_dataset) + "/", f"{bucket}/ds",
                                                                       recursive=True)
    return f"{bucket}/ds", env


def test_the_training_data_is_read_by_range_from_s3(s3, tiny_dataset):
    from training.data import DataConfig, TrainingSet
    from training.shards import SampleIndex

    data, _ = s3
    index = SampleIndex.from_store(data)
    assert len(index.urls) == 3 and all(u.startswith(f"{data}/shards/shard-") for u in index.urls)
    assert index.identity == SampleIndex.from_store(str(tiny_dataset)).identity  # a copy: the same dataset
    samples = TrainingSet(index, DataConfig(resolution=32), 0).__getitems__(list(range(20)))
    local = TrainingSet(SampleIndex.from_store(str(tiny_dataset)), DataConfig(resolution=32), 0).__getitems__(
        list(range(20)))
    assert len({s["key"] for s in samples}) == 20 and all(s["skipped"] == 0 for s in samples)
    assert [s["key"] for s in samples] == [s["key"] for s in local]
    assert all(torch.equal(a["reference"], b["reference"]) and torch.equal(a["target"], b["target"])
               for a, b in zip(samples, local))


def test_the_trainer_trains_from_s3_and_stops_on_unreadable_data(s3, tmp_path):
    data, env = s3
    cmd = [sys.executable, "training/train.py", "--profile", "tiny", "--max-steps", "2", "--val-samples", "0"]
    proc = subprocess.run([*cmd, "--data", data, "--out", str(tmp_path / "run")], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2 loss" in proc.stdout and (tmp_path / "run" / "adapters.safetensors").exists()

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"])
    for tar in fs.glob(data.removeprefix("s3://") + "/shards/*.tar"):
        fs.pipe(tar, b"\0" * 1024)  # every shard corrupted: before, the loader resampled them forever
    proc = subprocess.run([*cmd, "--data", data, "--out", str(tmp_path / "bad"), "--num-workers", "2"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "50 samples in a row could not be read, drawn from 3 shards" in errors[0]
    assert "Traceback" not in proc.stderr
