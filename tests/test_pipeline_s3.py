"""The pipeline writing to S3 (a local S3 API, moto's server mode, through s3fs): killed and resumed, verified."""

import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import ROOT, dataset_keys, pipeline_cmd
from manifests.schema import read_manifests
from dreamcache.store import Store

pytestmark = pytest.mark.slow


def s3_keys(store):
    keys = []
    for m in read_manifests(store):
        with tarfile.open(fileobj=io.BytesIO(store.read_bytes("shards", m.shard))) as tar:
            keys += sorted({n.split(".", 1)[0] for n in tar.getnames()})
    return keys


def verify(url, env, *extra):
    return subprocess.run([sys.executable, "-m", "manifests", "verify", url, *extra], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **env})


def test_sigkilled_on_s3_resumes_to_the_same_keys_and_verifies(tiny_dataset, s3_bucket, tmp_path):
    bucket, env = s3_bucket
    url = f"{bucket}/ds"
    store = Store(url)
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen(pipeline_cmd(url), stdout=log, stderr=log, cwd=ROOT, start_new_session=True,
                            env={**os.environ, **env})
    try:
        while not store.exists("manifests", "shard-000000.json"):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.05)
            store.fs.invalidate_cache()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    store.fs.invalidate_cache()
    assert not Store(url).exists("dataset.json") or b'"complete": true' not in store.read_bytes("dataset.json")

    proc = subprocess.run(pipeline_cmd(url), capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    store.fs.invalidate_cache()
    assert s3_keys(store) == dataset_keys(tiny_dataset)  # nothing lost, nothing twice, same order
    assert [m.sha256 for m in read_manifests(store)] == [m.sha256 for m in read_manifests(Store(str(tiny_dataset)))]
    assert store.list("shards") == [m.shard for m in read_manifests(store)]  # no orphan, nothing staged
    assert store.fs.list_multipart_uploads(bucket.removeprefix("s3://")) == []  # none left open

    ok = verify(url, env, "--checksums")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    tar = store.path("shards", "shard-000001.tar")
    data = bytearray(store.fs.cat_file(tar))
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    store.fs.pipe_file(tar, bytes(data))
    bad = verify(url, env, "--checksums")
    assert bad.returncode == 1 and "shard-000001.tar" in bad.stdout + bad.stderr and "sha256" in bad.stdout + bad.stderr
    assert verify(url, env).returncode == 0  # sizes alone cannot see it: that is what --checksums is for
