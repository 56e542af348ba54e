"""The same job through `ray job submit` to a local `ray start --head` cluster, and the cluster config."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from conftest import ROOT, dataset_keys, pipeline_cmd

RAY = str(Path(sys.executable).with_name("ray"))


def test_cluster_yaml_validates_against_rays_own_schema():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"].get("GPU", 0) == 0  # head without GPU
    assert any("p5" in n["node_config"]["InstanceType"] for n in nodes.values())
    assert any("pip install" in c and "-e" in c for c in config["setup_commands"])
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    # The GPU workers (8 H100 per p5.48xlarge) are exactly what the default pools ask for, no more.
    from pipeline.config import ResourceConfig
    from pipeline.pools import demand

    gpu_nodes = sum(n["max_workers"] for n in nodes.values() if "p5" in n["node_config"]["InstanceType"])
    assert gpu_nodes * 8 == config["max_workers"] * 8 == demand(("target", "segment"), ResourceConfig())["GPU"] == 64


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_cluster(tmp_path):
    """`ray start --head --block` in its own process group: stopping it stops only what it started."""
    port, dash, agent = _free_port(), _free_port(), _free_port()
    temp = Path("/tmp") / f"ray-{os.getpid()}-{port}"  # short: Ray's socket paths have a length limit
    # The job's driver runs `python` from the head's PATH: make it this interpreter. Ray keeps a node at
    # 127.0.0.1 only as a one-machine Ray (otherwise it announces the machine's network address instead).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "ray-head.log", "wb")
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}",
                             "--num-cpus=2", "--disable-usage-stats", "--include-dashboard=true",
                             # its own job agent port: an embedded Ray of a test beside it holds Ray's default one
                             f"--dashboard-agent-listen-port={agent}"],
                            stdout=log, stderr=log, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        while subprocess.run([RAY, "job", "list", "--address", address], capture_output=True, env=env).returncode:
            assert head.poll() is None, (tmp_path / "ray-head.log").read_text()[-3000:]
            time.sleep(1)
        started = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "ray-head.log").read_text())  # without colours
        assert "Local node IP: 127.0.0.1" in started
        yield address, env, head
    finally:
        # SIGTERM to `ray start` alone: it stops what it started and exits (seconds). Sent to the whole group,
        # its children die first and it never notices. Then whatever is left of the group.
        head.terminate()
        try:
            with contextlib.suppress(subprocess.TimeoutExpired):  # slow to stop on a busy machine: killed below
                head.wait(120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_gives_the_same_keys(local_cluster, tiny_dataset, tmp_path):
    address, env, head = local_cluster
    out = tmp_path / "submitted"
    cmd = pipeline_cmd(out)
    cmd[:2] = ["python", "pipeline/run.py"]  # as the README has it, relative to --working-dir
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", *cmd]
    proc = subprocess.run(submit, capture_output=True, text=True, cwd=ROOT, env=env)
    # The dashboard answers `job list` before the head's job agent has registered; a submit in between is
    # refused with Ray's own advice to try again later (seen on a loaded machine).
    while proc.returncode and "No available agent to submit job" in proc.stderr:
        assert head.poll() is None
        time.sleep(1)
        proc = subprocess.run(submit, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "done: 48/48 triplets" in proc.stdout
    assert dataset_keys(out) == dataset_keys(tiny_dataset)
