"""A user's mistakes across the commands (and the latent cache's): one `error:` line, exit 2, no traceback, nothing lost.

Every case runs the command's own ``main`` in this process and fails before any model loads or Ray starts:
that is part of what is checked (a case that got as far as loading would take seconds, not milliseconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHARD, SIZE

pytestmark = pytest.mark.slow  # needs the pipeline's tiny dataset


def _pipeline(argv):
    from pipeline.run import main

    return main(argv)


def _train(argv):
    from training.train import main

    return main(argv)


def _manifests(argv):
    from manifests.__main__ import main

    return main(argv)


def _dreamcache(argv):
    from dreamcache.cli import main

    return main(argv)


def _encode(argv):
    from training.encode import main

    return main(argv)


COMMANDS = {"pipeline": _pipeline, "train": _train, "manifests": _manifests, "dreamcache": _dreamcache,
            "encode": _encode}


@pytest.fixture
def world(tiny_dataset, tmp_path):
    """Paths the bad invocations point at: a copy of the tiny dataset, a file, bad configs, a truncated cache."""
    w = {"tmp": tmp_path, "ds": shutil.copytree(tiny_dataset, tmp_path / "ds")}
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "bad.yaml").write_text("targets: {steps: 30\n")
    (tmp_path / "list.yaml").write_text("- targets.steps=30\n")
    (tmp_path / "not-an-image.jpg").write_text("hello\n")
    (tmp_path / "truncated.cache").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"__meta")
    foreign = tmp_path / "foreign" / "shards"
    foreign.mkdir(parents=True)
    (foreign / "my-own-data.tar").write_bytes(b"precious")
    return w


def dataset(*extra):
    return ["--size", str(SIZE), "--profile", "tiny", "--shard-size", str(SHARD), "--set",
            "segment.reference_format=png", "--set", "progress_interval=1", *extra]


def tiny_train(*extra):
    return ["--profile", "tiny", *extra]


# (name, command, argv from the paths, a phrase the message must contain, preparation)
CASES = [
    ("pipeline: --out is a file", "pipeline", lambda w: ["--size", "8", "--profile", "tiny", "--out", w["tmp"] / "file.txt"],
     "is a file"),
    ("pipeline: --out cannot be written", "pipeline",
     lambda w: ["--size", "8", "--profile", "tiny", "--out", "/proc/dreamcache-out"], "cannot write"),
    ("pipeline: --out is somebody else's folder", "pipeline",
     lambda w: ["--size", "8", "--profile", "tiny", "--out", w["tmp"] / "foreign"], "not a dataset written by"),
    ("pipeline: malformed --config", "pipeline",
     lambda w: ["--size", "8", "--out", w["tmp"] / "o", "--config", w["tmp"] / "bad.yaml"], "not valid YAML at line"),
    ("pipeline: --config holds a list", "pipeline",
     lambda w: ["--size", "8", "--out", w["tmp"] / "o", "--config", w["tmp"] / "list.yaml"], "not a mapping"),
    ("pipeline: --config missing", "pipeline",
     lambda w: ["--size", "8", "--out", w["tmp"] / "o", "--config", w["tmp"] / "nope.yaml"], "no such file"),
    ("pipeline: unknown protocol", "pipeline", lambda w: ["--size", "8", "--out", "foo://bucket/ds"],
     "cannot open foo://"),
    ("pipeline: gs:// without gcsfs", "pipeline", lambda w: ["--size", "8", "--out", "gs://bucket/ds"],
     "dreamcache[gcs]"),
    ("pipeline: bad --size", "pipeline", lambda w: ["--size", "-3", "--out", w["tmp"] / "o"], "size"),
    ("pipeline: bad --shard-size", "pipeline", lambda w: ["--size", "8", "--shard-size", "0", "--out", w["tmp"] / "o"],
     "--shard-size"),
    ("pipeline: unknown --set field", "pipeline", lambda w: ["--size", "8", "--set", "targets.stepz=3", "--out",
                                                             w["tmp"] / "o"], "unknown config field"),
    ("pipeline: missing --out", "pipeline", lambda w: ["--size", "8"], "--out"),
    ("pipeline: no calls per actor", "pipeline", lambda w: ["--size", "8", "--set", "resources.segment_calls=0",
                                                           "--out", w["tmp"] / "o"], "resources.segment_calls"),
    ("pipeline: a simulated model without its seconds", "pipeline",
     lambda w: ["--size", "8", "--profile", "tiny", "--set", "targets.model=simulate:fast", "--out", w["tmp"] / "o"],
     "simulate:DEVICE_SECONDS"),
    ("pipeline: resume with a manifest that is not JSON", "pipeline",
     lambda w: (w["ds"] / "manifests" / "shard-000001.json").write_text("{oops") and dataset("--out", w["ds"]),
     "shard-000001.json does not parse"),
    ("pipeline: resume with a committed tar cut short", "pipeline",
     lambda w: _truncate(w["ds"] / "shards" / "shard-000002.tar") and dataset("--out", w["ds"]),
     "shard-000002.tar is"),
    ("pipeline: resume with a different config", "pipeline",
     lambda w: dataset("--out", w["ds"], "--set", "targets.steps=9"), "different configuration"),
    ("pipeline: another run is writing", "pipeline",
     lambda w: _live_lock(w["ds"]) and dataset("--out", w["ds"]), "another run is writing"),
    ("train: --data missing", "train", lambda w: tiny_train("--out", w["tmp"] / "r"), "--data"),
    ("train: --data is not a dataset", "train", lambda w: tiny_train("--data", w["tmp"], "--out", w["tmp"] / "r"),
     "no committed shards"),
    ("train: --max-steps 0", "train", lambda w: tiny_train("--data", w["ds"], "--max-steps", "0"), "--max-steps"),
    ("train: --lr -1", "train", lambda w: tiny_train("--data", w["ds"], "--lr", "-1"), "--lr must be > 0"),
    ("train: --cache-timestep out of range", "train",
     lambda w: tiny_train("--data", w["ds"], "--cache-timestep", "1000"), "--cache-timestep"),
    ("train: --max-steps not a number", "train", lambda w: tiny_train("--max-steps", "ten"), "invalid int"),
    ("train: the paper base offline", "train", lambda w: ["--data", w["ds"], "--out", w["tmp"] / "r"],
     "stable-diffusion-v1-5"),
    ("train: --out is a file", "train", lambda w: tiny_train("--data", w["ds"], "--out", w["tmp"] / "file.txt"),
     "is a file"),
    ("train: --out holds a run", "train",
     lambda w: _run_folder(w["tmp"] / "run") and tiny_train("--data", w["ds"], "--out", w["tmp"] / "run"),
     "--resume to continue it"),
    ("train: --out on a filesystem a run cannot use", "train",
     lambda w: tiny_train("--data", w["ds"], "--out", "memory://run"), "a local folder or an object store"),
    ("train: --allow-change without --resume", "train",
     lambda w: tiny_train("--data", w["ds"], "--out", w["tmp"] / "r", "--allow-change", "lr"), "--allow-change"),
    ("train: global batch not a multiple", "train",
     lambda w: tiny_train("--data", w["ds"], "--out", w["tmp"] / "r", "--global-batch", "5"), "not a multiple"),
    ("encode: not a dataset", "encode", lambda w: [w["tmp"], "--base", "tiny:sd15"], "no committed shards"),
    ("encode: --batch-size 0", "encode", lambda w: [w["ds"], "--batch-size", "0"], "--batch-size"),
    ("encode: the paper base offline", "encode", lambda w: [w["ds"]], "stable-diffusion-v1-5"),
    ("manifests: sheet --n -3", "manifests", lambda w: ["sheet", w["ds"], "--n", "-3"], "--n"),
    ("manifests: stats to a .txt", "manifests", lambda w: ["stats", w["ds"], "--out", w["tmp"] / "stats.txt"],
     ".png"),
    ("manifests: sheet over a damaged manifest", "manifests",
     lambda w: (w["ds"] / "manifests" / "shard-000000.json").write_text("{oops") and ["sheet", w["ds"], "--out",
                                                                                   w["tmp"] / "s.html"],
     "shard-000000.json does not parse"),
    ("manifests: show a missing folder", "manifests", lambda w: ["show", w["tmp"] / "nope"], "no such dataset"),
    ("manifests: verify an unknown protocol", "manifests", lambda w: ["verify", "foo://x"], "cannot open foo://"),
    ("manifests: unknown command", "manifests", lambda w: ["shwo", w["ds"]], "invalid choice"),
    ("dreamcache: a reference that is not an image", "dreamcache",
     lambda w: ["personalize", "--adapters", w["tmp"] / "a.safetensors", "--reference", w["tmp"] / "not-an-image.jpg",
                "--subject", "dog", "--out", w["tmp"] / "dog.cache"], "not a readable image"),
    ("dreamcache: a missing adapter file", "dreamcache",
     lambda w: ["personalize", "--adapters", w["tmp"] / "a.safetensors", "--reference",
                _image(w["tmp"] / "ref.png"), "--subject", "dog", "--out", w["tmp"] / "dog.cache"],
     "no adapter file"),
    ("dreamcache: a truncated cache", "dreamcache",
     lambda w: ["generate", "--cache", w["tmp"] / "truncated.cache", "--prompt", "a dog", "--out", w["tmp"] / "x.png"],
     "not a readable feature cache"),
    ("dreamcache: generate --n 0", "dreamcache",
     lambda w: ["generate", "--cache", w["tmp"] / "c", "--prompt", "a", "--out", w["tmp"] / "x.png", "--n", "0"], "--n"),
    ("dreamcache: generate --steps 0", "dreamcache",
     lambda w: ["generate", "--cache", w["tmp"] / "c", "--prompt", "a", "--out", w["tmp"] / "x.png", "--steps", "0"],
     "--steps"),
    ("dreamcache: evaluate without the benchmark", "dreamcache",
     lambda w: ["evaluate", "--adapters", w["tmp"] / "a.safetensors", "--dreambooth", w["tmp"] / "nope"],
     "not the DreamBooth dataset"),
]


def _truncate(path: Path) -> bool:
    path.write_bytes(path.read_bytes()[:1000])
    return True


def _live_lock(ds: Path) -> bool:
    import socket

    lock = {"run": "x", "host": socket.gethostname(), "pid": os.getpid(), "started": "now",
            "heartbeat_unix": time.time()}
    (ds / "lock.json").write_text(json.dumps(lock))
    return True


def _run_folder(out: Path) -> bool:
    out.mkdir()
    (out / "config.json").write_text("{}")
    return True


def _image(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(path)
    return path


@pytest.mark.parametrize("name,command,argv,phrase", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_error_line_and_exit_2(world, capsys, name, command, argv, phrase):
    args = [str(a) for a in argv(world)]
    before = _snapshot(world["tmp"])
    try:
        code = COMMANDS[command](args)
    except SystemExit as e:  # argparse exits instead of returning
        code = e.code
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert code == 2, (code, out.out[-2000:], out.err[-2000:])
    assert "Traceback" not in out.err + out.out
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], out.err
    assert phrase in errors[0], errors[0]
    assert _snapshot(world["tmp"]) == before, "a refused command changed files"


def _snapshot(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size, except a live lock the case wrote on purpose."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_a_folder_that_is_not_ours_keeps_every_file(tmp_path, capsys):
    """Foreign tars, in a folder of ours or not, are never deleted; our own uncommitted shards are."""
    from manifests.lock import claim
    from dreamcache.store import Store
    from dreamcache.errors import PipelineError
    from pipeline.writer import recover

    store = Store(str(tmp_path / "ds"))
    claim(store)  # an empty folder becomes ours
    (tmp_path / "ds" / "shards").mkdir()
    (tmp_path / "ds" / "shards" / "shard-000000.tar").write_bytes(b"renamed, never committed")
    (tmp_path / "ds" / "shards" / ".shard-000001.tar.tmp-0123abcd").write_bytes(b"half written")
    (tmp_path / "ds" / "shards" / ".keep").write_bytes(b"hidden, not ours: left alone")
    assert recover(store) == []
    assert sorted(p.name for p in (tmp_path / "ds" / "shards").iterdir()) == [".keep"]
    (tmp_path / "ds" / "shards" / "mine.tar").write_bytes(b"precious")
    (tmp_path / "ds" / "shards" / "shard-000000.tar").write_bytes(b"uncommitted again")
    with pytest.raises(PipelineError, match="did not write"):
        recover(store)
    assert (tmp_path / "ds" / "shards" / "mine.tar").read_bytes() == b"precious"
    assert (tmp_path / "ds" / "shards" / "shard-000000.tar").exists()  # refused before deleting anything


def test_the_run_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path):
    from manifests.lock import FolderInUse, RunLock, lock_state
    from dreamcache.store import Store

    store = Store(str(tmp_path))
    with RunLock(store, heartbeat_s=0.05) as first:
        beat = json.loads((tmp_path / "lock.json").read_text())["heartbeat_unix"]
        while json.loads((tmp_path / "lock.json").read_text())["heartbeat_unix"] == beat:
            time.sleep(0.01)  # the heartbeat thread rewrites it
        assert lock_state(store).state == "live"
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):
            RunLock(store).__enter__()
        assert json.loads((tmp_path / "lock.json").read_text())["run"] == first.id
    assert not (tmp_path / "lock.json").exists()  # released at the end of the run

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "lock.json").write_text(json.dumps({"run": "gone", "host": __import__("socket").gethostname(),
                                                    "pid": dead.pid, "heartbeat_unix": time.time()}))
    assert lock_state(store).state == "stale"  # fresh heartbeat, but its process is gone
    with RunLock(store) as taken:
        assert taken.previous.info["run"] == "gone"
    old = {"run": "elsewhere", "host": "another-machine", "pid": 1, "heartbeat_unix": time.time() - 3600}
    (tmp_path / "lock.json").write_text(json.dumps(old))
    assert lock_state(store).state == "stale"  # another host: stale once the heartbeat is old


def test_status_tells_running_interrupted_and_incomplete_apart(tiny_dataset, tmp_path, capsys):
    from manifests.__main__ import main

    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    index = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**index, "complete": False, "status": "running"}))
    assert main(["verify", str(ds)]) == 1
    assert "incomplete: 48 of 48 triplets; interrupted" in capsys.readouterr().out
    assert main(["verify", str(ds), "--allow-incomplete"]) == 0
    capsys.readouterr()
    assert main(["show", str(ds)]) == 0
    assert "INTERRUPTED: no run is writing it" in capsys.readouterr().out
    _live_lock(ds)
    assert main(["show", str(ds)]) == 0
    assert f"running: pid {os.getpid()}" in capsys.readouterr().out
    assert main(["verify", str(ds)]) == 1
    assert "a run is writing it now" in capsys.readouterr().out


def test_ctrl_c_says_how_to_resume_and_releases_the_lock(tmp_path, capsys, monkeypatch):
    import pipeline.driver
    import pipeline.run

    def interrupted(cfg, store, verbose, lock):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.driver, "_run", interrupted)
    code = pipeline.run.main(["--size", "8", "--profile", "tiny", "--out", str(tmp_path / "ds")])
    assert code == 130
    assert "run the same command to resume" in capsys.readouterr().err
    assert not (tmp_path / "ds" / "lock.json").exists() and (tmp_path / "ds" / "owner.json").exists()


def test_transparent_references_go_on_white():
    import numpy as np
    from PIL import Image

    from dreamcache.images import on_white
    from dreamcache.images import to_tensor

    rgba = np.zeros((16, 16, 4), np.uint8)  # transparent black everywhere ...
    rgba[4:12, 4:12] = (200, 30, 30, 255)  # ... but an opaque red square
    image = Image.fromarray(rgba, "RGBA")
    rgb = np.asarray(on_white(image))
    assert (rgb[0, 0] == 255).all() and tuple(rgb[8, 8]) == (200, 30, 30)
    x = to_tensor(image, 16)  # what personalisation and training feed the VAE
    assert x[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert Image.fromarray(rgba[..., :3]).convert("RGB").getpixel((0, 0)) == (0, 0, 0)  # what convert() gave


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_two_runs_racing_for_a_folder_one_takes_the_lock(where, tmp_path, monkeypatch, request):
    """The other run checked the lock a moment before the first created it: the exclusive create (a hard link,
    or S3's conditional PUT) refuses it."""
    import manifests.lock as lock
    from dreamcache.store import Store

    store = Store(str(tmp_path)) if where == "local" else Store(request.getfixturevalue("s3_bucket")[0] + "/ds")
    with lock.RunLock(store):
        monkeypatch.setattr(lock, "lock_state", lambda store, stale_s=0: lock.LockState("none", {}, 0.0))
        with pytest.raises(lock.FolderInUse, match="at the same moment"):
            lock.RunLock(store).__enter__()


def test_a_run_whose_lock_was_taken_stops_before_its_next_commit(tmp_path):
    import manifests.lock as lock
    from dreamcache.store import Store

    store = Store(str(tmp_path))
    second = lock.RunLock(store, force=True)
    with lock.RunLock(store, heartbeat_s=0.02) as first:
        first.check()  # still ours
        second.__enter__()  # --break-lock from another run
        while not first.lost:
            time.sleep(0.01)
        with pytest.raises(lock.FolderInUse, match="took the lock"):
            first.check()
    assert json.loads((tmp_path / "lock.json").read_text())["run"] == second.id  # the new owner's lock stays
    second.__exit__(None, None, None)
    assert not (tmp_path / "lock.json").exists()


def test_overwrite_deletes_only_the_runs_files(tmp_path):
    from dreamcache.store import Store
    from training.runs import RunFolderError, prepare

    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="--resume to continue it"):
        prepare(Store(str(out)), resume=False, overwrite=False)
    prepare(Store(str(out)), resume=True, overwrite=False)  # continuing it: nothing deleted
    assert (out / "config.json").exists()
    prepare(Store(str(out)), resume=False, overwrite=True)  # rank 0 alone checks --out (the others never read it)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_constrained_captions_without_xgrammar_fail_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    from pipeline.run import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xgrammar" else real(name, *a))
    code = main(["--size", "8", "--profile", "tiny", "--out", str(tmp_path / "ds"),
                 "--set", "captions.backend=transformers"])
    assert code == 2 and "needs xgrammar" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()  # checked before --out is touched


def test_fp8_targets_without_torchao_fail_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    from pipeline.run import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "torchao" else real(name, *a, **k))
    code = main(["--size", "8", "--profile", "tiny", "--out", str(tmp_path / "ds"),
                 "--set", "targets.fp8=true", "--set", "targets.dtype=bfloat16"])
    assert code == 2 and "targets.fp8 needs torchao" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()  # checked before --out is touched
    code = main(["--size", "8", "--profile", "tiny", "--out", str(tmp_path / "ds"), "--set", "targets.fp8=true"])
    assert code == 2 and "targets.dtype=bfloat16" in capsys.readouterr().err  # the tiny profile's float32
