"""Exact resume: a run killed right after a checkpoint and resumed, with what the config calls free changed, on
two nodes with node-local --out folders, or with --out on an object store, ends where the uninterrupted run does.

The kill is deterministic: a start-up hook (a sitecustomize) SIGKILLs the trainer right after it wrote the
checkpoint of step ``KILL_AFTER_CHECKPOINT``, as a crash would. Every run is the tiny profile (global batch 4,
micro-batch 2, a checkpoint every 2 steps), 4 steps, no validation grids.
"""

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file

from conftest import ROOT

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
STEPS = 4
TOLERANCE = 1e-6  # a changed micro-batch: every adapter weight within this of the uninterrupted run's

KILL_HOOK = """
import os
import signal
import sys

if os.environ.get("KILL_AFTER_CHECKPOINT") and sys.argv and sys.argv[0].endswith("train.py"):
    import training.checkpoints as checkpoints

    _save = checkpoints.save_checkpoint

    def save_checkpoint(store, unet, opt, cfg, run):
        url = _save(store, unet, opt, cfg, run)
        if run["step"] == int(os.environ["KILL_AFTER_CHECKPOINT"]):
            os.killpg(os.getpgrp(), signal.SIGKILL)  # this process and its loader workers, right after the checkpoint
        return url

    checkpoints.save_checkpoint = save_checkpoint
"""


def command(data, out, *extra, launcher=()):
    return [*launcher, str(ROOT / "training" / "train.py"), "--profile", "tiny", "--data", str(data), "--out", str(out),
            "--max-steps", str(STEPS), "--val-samples", "0", *map(str, extra)]


def environment(tmp_path, kill_after=None, extra=None) -> dict:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    # One thread per process, as torchrun sets for several ranks per node: CPU matmuls sum in a thread-count
    # dependent order, and the runs compared here differ in their ranks per node.
    env = {**os.environ, **(extra or {}), "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    env.pop("KILL_AFTER_CHECKPOINT", None)
    if kill_after:
        env["KILL_AFTER_CHECKPOINT"] = str(kill_after)
    return env


def run(data, out, *extra, tmp_path, launcher=(sys.executable,), kill_after=None, env=None, check=True):
    proc = subprocess.run(command(data, out, *extra, launcher=launcher), capture_output=True, text=True, check=False,
                          cwd=tmp_path, env=environment(tmp_path, kill_after, env), start_new_session=True)
    if kill_after:
        assert proc.returncode != 0 and f"step {kill_after + 1}/" not in proc.stdout, proc.stdout[-2000:]
    elif check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def final_state(out) -> dict:
    """The adapters and the optimizer state of the run's last checkpoint, and its run.json."""
    import json

    folder = Path(out) / "checkpoints" / f"step-{STEPS:08d}"
    trainer = torch.load(folder / "trainer.pt", weights_only=True)
    return {"adapters": load_file(str(folder / "adapters.safetensors")), "optimizer": trainer["optimizer"],
            "run": json.loads((folder / "run.json").read_text())}


def assert_same(a: dict, b: dict) -> None:
    """Adapters and optimizer state bit for bit, and the same run record (step, position, keys digest)."""
    assert a["adapters"].keys() == b["adapters"].keys()
    for k in a["adapters"]:
        assert torch.equal(a["adapters"][k], b["adapters"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) == len(a["adapters"])
    for i in sa:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][name], sb[i][name]), (i, name)
    assert a["run"] == b["run"]


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """The uninterrupted run: one process, no loader workers."""
    tmp = tmp_path_factory.mktemp("reference")
    run(tiny_dataset, tmp / "run", "--num-workers", 0, tmp_path=tmp)
    return final_state(tmp / "run")


def test_resumed_with_other_loader_workers_and_a_copy_of_the_data_is_bit_exact(tiny_dataset, reference, tmp_path):
    """Killed with 2 loader workers, resumed with 1 on a copy of the dataset elsewhere: the same adapters and
    optimizer state as the uninterrupted run with none, bit for bit."""
    out = tmp_path / "run"
    run(tiny_dataset, out, "--num-workers", 2, tmp_path=tmp_path, kill_after=2)
    assert [p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists()] == ["step-00000002"]
    copy = shutil.copytree(tiny_dataset, tmp_path / "copy")
    resumed = run(copy, out, "--num-workers", 1, "--resume", tmp_path=tmp_path)
    assert "resuming at step 2" in resumed.stdout
    assert_same(final_state(out), reference)


def test_a_final_checkpoint_off_the_checkpoint_grid_resumes_exactly(tiny_dataset, reference, tmp_path):
    """A run of 3 steps ends with a checkpoint at 3 (not a multiple of --checkpoint-every 2); continued to 4,
    it is the uninterrupted 4-step run."""
    out = tmp_path / "run"
    run(tiny_dataset, out, "--max-steps", 3, tmp_path=tmp_path)
    run(tiny_dataset, out, "--resume", tmp_path=tmp_path)
    assert_same(final_state(out), reference)


def test_a_micro_batch_change_is_refused_then_accepted_on_purpose_with_the_same_keys(tiny_dataset, reference,
                                                                                   tmp_path):
    """Killed at micro-batch 4 (no accumulation), resumed at 1 (4 micro-batches per step); the uninterrupted
    run used 2. Refused by default with the reason; with --allow-change micro_batch every step sees the same
    keys (the run's digest) and the adapters agree to float32 rounding."""
    out = tmp_path / "run"
    run(tiny_dataset, out, "--micro-batch", 4, tmp_path=tmp_path, kill_after=2)
    refused = run(tiny_dataset, out, "--micro-batch", 1, "--resume", tmp_path=tmp_path, check=False)
    assert refused.returncode == 2 and "--micro-batch 4 -> 1 (the same samples and draws per step" in refused.stderr
    assert "--allow-change micro_batch" in refused.stderr
    run(tiny_dataset, out, "--micro-batch", 1, "--resume", "--allow-change", "micro_batch", tmp_path=tmp_path)
    got = final_state(out)
    assert got["run"] == reference["run"]  # step, position and the digest of every (position, key) seen
    for k, want in reference["adapters"].items():
        # Adam normalises each update, so float32 rounding in the summed gradient moves a weight by a small
        # fraction of the learning rate (1e-4) per step.
        assert torch.allclose(got["adapters"][k], want, rtol=0, atol=TOLERANCE), (k, (got["adapters"][k] - want).abs())


def test_resume_refuses_other_data_and_a_checkpoint_it_cannot_load_and_changes_nothing(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    run(tiny_dataset, out, "--max-steps", 2, tmp_path=tmp_path)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    fewer = shutil.copytree(tiny_dataset, tmp_path / "fewer")
    (fewer / "manifests" / "shard-000002.json").unlink()
    proc = run(fewer, out, "--resume", tmp_path=tmp_path, check=False)
    assert proc.returncode == 2
    assert "dataset 3 shards/48 samples/" in proc.stderr and "-> 2 shards/32 samples/" in proc.stderr
    assert "--allow-change dataset" in proc.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    trainer = out / "checkpoints" / "step-00000002" / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:100])  # cut short: rank 0 cannot load it, after the models loaded
    two = run(tiny_dataset, out, "--resume", "--allow-change", "world_size", tmp_path=tmp_path, check=False,
              launcher=(TORCHRUN, "--standalone", "--nproc-per-node=2"))
    assert two.returncode != 0
    errors = [line for line in two.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoints/step-00000002 cannot be loaded" in errors[0], two.stderr[-3000:]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def _identities(rank: int, port: int, identities: list, found) -> None:
    import torch.distributed as dist

    from training.distributed import differing

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(identities))
    error = differing(identities[rank], len(identities))
    found.put((rank, None if error is None else str(error)))
    dist.destroy_process_group()


def test_ranks_that_see_other_datasets_all_stop_with_the_same_error():
    """A node-local copy of another version of the dataset would give that rank other samples at the same
    positions: every rank checks every other's dataset identity and stops with the same error."""
    import torch.multiprocessing as mp

    same = {"shards": 3, "samples": 48, "sha256": "ab"}
    for identities, want in (([same, dict(same)], None), ([same, {**same, "sha256": "cd"}], "rank 1 sees")):
        found = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(_identities, (free_port(), identities, found), nprocs=2, start_method="spawn")
        errors = dict(found.get() for _ in identities)
        assert errors[0] == errors[1] and (errors[0] is None if want is None else want in errors[0]), errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(data, outs, *extra, tmp_path, kill_after=None):
    """Two torchrun "nodes" on this machine, one rank each, joined by one rendezvous; each its own --out.
    With ``kill_after``, rank 0 dies right after that checkpoint and node 1 is then stopped too."""
    port = free_port()
    env = environment(tmp_path, kill_after)
    procs = []
    for node, out in enumerate(outs):
        launcher = (TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                    "--master-addr", "127.0.0.1", "--master-port", str(port))
        with open(tmp_path / f"node{node}.log", "a") as log:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(command(data, out, *extra, launcher=launcher), stdout=log, stderr=log,
                                          cwd=tmp_path, env=env, start_new_session=True))
    first = procs[0].wait()
    if kill_after:
        os.killpg(procs[1].pid, signal.SIGKILL)  # node 1 waits for a rank that is gone
    codes = [first, procs[1].wait()]
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    if not kill_after:
        assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return logs


def test_two_nodes_with_node_local_out_folders_resume_as_one_node_would(tiny_dataset, tmp_path):
    """Rank 0 reads the checkpoint from its own --out and broadcasts it: node 1's --out never holds anything,
    and the resumed two-node run ends in the state of an uninterrupted two-rank run on one node."""
    one = tmp_path / "one"
    run(tiny_dataset, one, tmp_path=tmp_path, launcher=(TORCHRUN, "--standalone", "--nproc-per-node=2"))
    outs = [tmp_path / "node0", tmp_path / "node1"]
    two_nodes(tiny_dataset, outs, tmp_path=tmp_path, kill_after=2)
    assert (outs[0] / "checkpoints" / "step-00000002" / "COMPLETE").exists()
    assert not (outs[0] / "checkpoints" / "step-00000004").exists()
    logs = two_nodes(tiny_dataset, outs, "--resume", tmp_path=tmp_path)
    assert "resuming at step 2: 2 rank(s)" in logs[0]
    assert_same(final_state(outs[0]), final_state(one))
    assert not outs[1].exists()


def test_out_on_an_object_store_is_killed_and_resumed_to_the_uninterrupted_run(tiny_dataset, reference, s3_bucket,
                                                                             tmp_path):
    """--out s3://...: checkpoints uploaded file by file, COMPLETE last, found again by listing; TensorBoard in
    ./tensorboard/<bucket>/<prefix> locally."""
    import s3fs

    bucket, env = s3_bucket
    out = f"{bucket}/runs/tiny"
    run(tiny_dataset, out, tmp_path=tmp_path, kill_after=2, env=env)
    fs = s3fs.S3FileSystem(endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"])
    prefix = out.removeprefix("s3://")
    assert sorted(fs.ls(f"{prefix}/checkpoints/step-00000002")) == [
        f"{prefix}/checkpoints/step-00000002/{n}" for n in ("COMPLETE", "adapters.safetensors", "config.json",
                                                              "run.json", "trainer.pt")]
    resumed = run(tiny_dataset, out, "--resume", "--keep-checkpoints", 1, tmp_path=tmp_path, env=env)
    assert "resuming at step 2" in resumed.stdout
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[1] for p in fs.ls(f"{prefix}/checkpoints")] == ["step-00000004"]  # pruned
    folder = f"{prefix}/checkpoints/step-{STEPS:08d}"
    import json

    got = {"adapters": load(fs.cat(f"{folder}/adapters.safetensors")),
           "optimizer": torch.load(io.BytesIO(fs.cat(f"{folder}/trainer.pt")), weights_only=True)["optimizer"],
           "run": json.loads(fs.cat(f"{folder}/run.json"))}
    assert_same(got, reference)
    assert fs.cat(f"{prefix}/adapters.safetensors") == fs.cat(f"{folder}/adapters.safetensors")
    assert list((tmp_path / "tensorboard" / prefix).iterdir())  # the local folder the log named
    assert f"TensorBoard in tensorboard/{prefix}" in resumed.stdout


def test_what_a_resume_refuses_names_the_reason_and_the_flag_that_accepts_it():
    from training.runs import RunFolderError, changes, latents_change, refuse, run_changes

    saved = {"lr": 1e-4, "micro_batch": 2, "num_workers": 0, "data": "a", "max_steps": 4, "tf32": True, "base": "x",
             "checkpoint_every": 2}
    new = {**saved, "micro_batch": 1, "num_workers": 3, "data": "b", "max_steps": 9, "tf32": False,
           "checkpoint_every": 7}
    found = changes(saved, new, set())
    assert found == [("--micro-batch 2 -> 1 (the same samples and draws per step, the gradient summed in another "
                      "order: the result differs in the last bits)"),
                     "--tf32 True -> False (matmul precision on the GPU)"]
    assert changes(saved, new, {"micro_batch", "tf32"}) == []
    architecture = "--base x -> y (the checkpoint's architecture; cannot change)"
    assert changes(saved, {**saved, "base": "y"}, {"base"}) == [architecture]
    # A checkpoint from before --compile ran uncompiled: resuming uncompiled is no change, compiled is one.
    assert changes(saved, {**saved, "compile": False, "compile_backend": "inductor"}, set()) == []
    assert changes(saved, {**saved, "compile": True, "compile_backend": "inductor"}, set()) == [
        "--compile False -> True (the same computation compiled: the result differs in the last bits)"]
    dataset = {"shards": 3, "samples": 48, "sha256": "ab"}
    run, other_run = {"world_size": 1, "dataset": dataset}, {"world_size": 4, "dataset": {**dataset, "sha256": "cd"}}
    assert run_changes(run, {"world_size": 1, "dataset": dict(dataset)}, set()) == []  # a copy elsewhere
    other = run_changes(run, other_run, set())
    assert other[0].startswith("world_size 1 -> 4 ranks (")
    assert other[1].startswith("dataset 3 shards/48 samples/ab -> 3 shards/48 samples/cd (")
    assert run_changes(run, other_run, {"world_size", "dataset"}) == []
    assert run_changes(None, run, set())[0].startswith("dataset: the checkpoint does not record its data order")
    assert latents_change({"latents": "cache"}, "vae", set())[0].startswith("latents cache -> vae (")
    assert latents_change({"latents": "cache"}, "vae", {"latents"}) == []
    with pytest.raises(RunFolderError, match="on purpose: --allow-change micro_batch tf32 world_size dataset, or"):
        refuse(found + other, "step-00000002")
    with pytest.raises(RunFolderError) as refused:  # one change that can never be made: no --allow-change hint
        refuse([*found, architecture], "step-00000002")
    assert "--allow-change" not in str(refused.value)
