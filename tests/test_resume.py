"""SIGKILL at any point, rerun: exactly the key set of an uninterrupted run, nothing half-written counted."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import ROOT, SIZE, dataset_keys, pipeline_cmd, run_pipeline
from manifests.schema import read_manifests
from dreamcache.store import Store

pytestmark = pytest.mark.slow


def _exists(pattern):
    return lambda out: any(out.glob(pattern))


# (A first shard half written is the second's case without a committed shard before it; recover() removing a
# temporary tar is a unit test of tests/test_writer.py.)
KILL_POINTS = {
    "while_planning": _exists("plan/*"),
    "just_after_first_commit": _exists("manifests/shard-000000.json"),
    "second_shard_half_written": _exists("shards/.shard-000001.tar.tmp-*"),
}


# Loaded at start-up by the run's processes (a sitecustomize): the writer pauses after each row, so that a shard
# stays half-written for a while. Rows reach the writer in bursts (Reorder releases held rows together), and a
# 16-sample shard written in one burst lives for milliseconds: a kill point could be missed. Data is unchanged.
SLOW_WRITER = """
import time

import pipeline.writer as writer

_add = writer.ShardWriter.add


def add(self, row):
    _add(self, row)
    time.sleep(0.02)


writer.ShardWriter.add = add

# With TARGET_CALLS set: each SDXL stage call records its process and takes 0.3 s longer, so that the stage is
# certainly mid-run when the test kills its worker, and the record shows which workers did the work. Patched
# when pipeline.targets is imported, not here: importing it (torch, diffusers) in every one of Ray's own
# processes would slow the node's start-up past Ray's own limit on a busy machine.
import os

if os.environ.get("TARGET_CALLS"):
    import importlib.abc
    import importlib.machinery
    import sys

    def slowed(module):
        _process = module.TargetStage.process

        def process(self, rows):
            with open(os.environ["TARGET_CALLS"], "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(0.3)
            return _process(self, rows)

        module.TargetStage.process = process

    class PatchTargets(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "pipeline.targets":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            exec_module = spec.loader.exec_module

            def run(module):
                exec_module(module)
                slowed(module)

            spec.loader.exec_module = run
            return spec

    sys.meta_path.insert(0, PatchTargets())
"""


def injected(out, **env) -> dict:
    """The environment of a run whose processes load SLOW_WRITER at start-up."""
    inject = out.parent / f"{out.name}-inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(SLOW_WRITER)
    return {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(inject), str(ROOT)])}


def kill_when(out, condition, *extra):
    """Starts the pipeline and SIGKILLs its whole process group (driver and its Ray) once condition holds."""
    log = open(out.parent / f"{out.name}-killed.log", "ab")
    proc = subprocess.Popen(pipeline_cmd(out, *extra), stdout=log, stderr=log, cwd=ROOT, start_new_session=True,
                            env=injected(out))
    try:
        while not condition(out):
            assert proc.poll() is None, "the run ended before the kill point"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_consistent(out, expected_keys):
    ms = read_manifests(Store(str(out)))
    keys = dataset_keys(out)
    assert keys == expected_keys  # same keys, same order: nothing lost, nothing twice
    assert sorted(os.listdir(out / "shards")) == [m.shard for m in ms]  # no orphan, no temporary
    index = json.loads((out / "dataset.json").read_text())
    assert index["complete"]
    assert index["totals"]["samples"] == sum(m.count for m in ms) == SIZE
    assert [s["name"] for s in index["shards"]] == [m.shard for m in ms]


def test_sigkill_at_every_kill_point_in_turn_then_rerun(tiny_dataset, tmp_path):
    """One dataset killed at each point in turn (each rerun resumes the last one's leftovers), then finished by a
    run whose SDXL worker is SIGKILLed once it has done a batch (Ray restarts the actor and retries its task).
    The result is the uninterrupted run's, byte for byte: the same command and seed give the same keys and the
    same shards."""
    out = tmp_path / "ds"
    for point, condition in KILL_POINTS.items():
        kill_when(out, condition)
        assert not (out / "dataset.json").exists() or not json.loads((out / "dataset.json").read_text())["complete"]
    log, calls = open(tmp_path / "run.log", "wb"), tmp_path / "target-calls"
    proc = subprocess.Popen(pipeline_cmd(out), stdout=log, stderr=log, cwd=ROOT, start_new_session=True,
                            env=injected(out, TARGET_CALLS=str(calls)))
    try:
        while not calls.exists() or not calls.read_text().strip():  # the SDXL stage is at work
            assert proc.poll() is None, "the run ended first: " + (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.01)
        victims = _stage_workers(proc.pid, "TargetStage")
        assert victims, "no SDXL worker found"
        for v in victims:
            v.kill()
        assert proc.wait() == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "resuming" in (tmp_path / "run.log").read_text()
    workers = calls.read_text().split()
    assert {v.pid for v in victims} & set(map(int, workers)) and len(set(workers)) >= 2  # the restarted one went on
    assert_consistent(out, dataset_keys(tiny_dataset))
    shas = [m.sha256 for m in read_manifests(Store(str(out)))]
    assert shas == [m.sha256 for m in read_manifests(Store(str(tiny_dataset)))]  # byte-identical shards
    proc = run_pipeline(out)  # a finished dataset: the rerun changes nothing and starts nothing
    assert "starting an embedded local Ray" not in proc.stderr
    assert [m.sha256 for m in read_manifests(Store(str(out)))] == shas


def test_rerun_with_other_flags_is_refused_and_changes_nothing(tiny_dataset, tmp_path):
    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")  # the session's dataset is read by other workers meanwhile
    before = {p.name: p.stat().st_mtime_ns for p in ds.rglob("*")}
    proc = subprocess.run(pipeline_cmd(ds, "--set", "targets.steps=5"), capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "different configuration" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in ds.rglob("*")} == before


def _stage_workers(pid, name):
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True) if name in " ".join(p.cmdline())]
