"""Shared fixtures: tiny models built once per session, and a helper that runs the pipeline as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIZE, SHARD = 48, 16

# The longest modules first: pytest-xdist hands each module whole to a worker in collection order, and the
# longest last (the small world's proof, about 8 minutes) would leave the other worker idle at the end.
FIRST = ("test_world_proof.py", "test_train.py", "test_train_resume.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: next((i for i, name in enumerate(FIRST) if item.path.name == name), len(FIRST)))


if os.environ.get("PYTEST_XDIST_WORKER"):
    # As many single-threaded workers as cores (``make test``: two). With two threads each, the workers'
    # threads outnumber the cores, and torch's OpenMP threads, spinning at every barrier, wait on each other:
    # one benchmark test took 159 s beside another worker, against 21 s alone. Subprocesses inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def shared(tmp_path_factory, name: str, build) -> Path:
    """``build(path)`` once per test session however many pytest-xdist workers run it (``make test`` runs two):
    the first worker to get here builds it under a file lock, the others wait for it and reuse it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # what a worker that failed half-way left
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session", autouse=True)
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny models for the whole session, in the Hugging Face layout (subprocesses inherit the env var)."""
    from filelock import FileLock

    from dreamcache.tiny import ensure_tiny_models

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("RAY_ADDRESS", None)
    given = os.environ.get("DREAMCACHE_TEST_TINY_DIR")
    if given:
        with FileLock(f"{given.rstrip('/')}.lock"):  # other sessions may share it
            ensure_tiny_models(Path(given))
        path = Path(given)
    else:
        path = shared(tmp_path_factory, "tiny-models", ensure_tiny_models)
    os.environ["DREAMCACHE_TINY_DIR"] = str(path)
    return path


def pipeline_cmd(out: Path, *extra: str, size: int = SIZE) -> list[str]:
    return [sys.executable, str(ROOT / "pipeline" / "run.py"), "--size", str(size), "--profile", "tiny",
            "--out", str(out), "--shard-size", str(SHARD), "--set", "segment.reference_format=png",
            "--set", "progress_interval=1", *extra]


def run_pipeline(out: Path, *extra: str, env: dict | None = None, size: int = SIZE) -> subprocess.CompletedProcess:
    proc = subprocess.run(pipeline_cmd(out, *extra, size=size), capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"pipeline failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """One uninterrupted tiny run: the reference that other runs are compared with."""
    return shared(tmp_path_factory, "reference-run", run_pipeline)


def dataset_keys(out: Path) -> list[str]:
    """Keys of every sample in the committed shards, read from the tars themselves."""
    import tarfile

    from manifests.schema import read_manifests
    from dreamcache.store import Store

    keys = []
    for m in read_manifests(Store(str(out))):
        with tarfile.open(out / "shards" / m.shard) as tar:
            keys += sorted({n.split(".", 1)[0] for n in tar.getnames()})
    return keys


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 API (moto's server mode) for the whole session; yields the environment that points the
    AWS SDK and fsspec (this process and subprocesses) at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}"}  # fsspec's configuration from the environment
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A new bucket on the local S3 server, this process configured for it; yields (s3://BUCKET, the
    environment a subprocess needs)."""
    import uuid

    import fsspec
    import s3fs

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_server["FSSPEC_S3_ENDPOINT_URL"]})
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"data-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_server["FSSPEC_S3_ENDPOINT_URL"]).mkdir(bucket)
    try:
        yield f"s3://{bucket}", s3_server
    finally:
        s3fs.S3FileSystem.clear_instance_cache()

