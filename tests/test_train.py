"""The trainer on the pipeline's tiny dataset: torchrun, DDP equivalence, corrupt data, learning (resume:
test_train_resume.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def train(data, out, *extra, nproc=None, check=True):
    cmd = ([TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"] if nproc else [sys.executable]) + [
        "training/train.py", "--profile", "tiny", "--data", str(data), "--out", str(out), *map(str, extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_torchrun_two_ranks_saves_adapter_tensors_only(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    proc = train(tiny_dataset, out, "--max-steps", 6, "--cache-prompt", "a photo of {subject}", nproc=2)
    assert "2 rank(s) x 2 x 1 accumulation = global batch 4" in proc.stdout
    assert "step 6/6 loss" in proc.stdout
    assert "step 6 reference check: loss" in proc.stdout
    with safe_open(str(out / "adapters.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("dreamcache.") for k in keys)
    assert len(keys) == 5 * 9  # 5 layers x (q, k, v, out.w, out.b, proj.w, proj.b, norm.w, norm.b)
    assert meta["step"] == "6" and meta["base"] == "tiny:sd15" and json.loads(meta["layers"])[0] == "mid_block.attentions.0"
    assert meta["resolution"] == "32"  # the base model's own: U-Net sample size 16 x VAE factor 2
    assert meta["cache_timestep"] == "1"  # the paper's; generation caches references at the same timestep
    assert meta["cache_prompt"] == "a photo of {subject}" and meta["fusion"] == "concat"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-0000000{i}" for i in (2, 4, 6)]
    assert json.loads((out / "config.json").read_text())["max_steps"] == 6
    assert list((out / "tensorboard").iterdir())
    # Validation grids at every checkpoint: 2 fixed references x (reference, own caption, new context), 32 px.
    grids = sorted((out / "validation").glob("*.jpg"))
    assert [p.name for p in grids] == [f"step-0000000{i}.jpg" for i in (2, 4, 6)]
    assert all(Image.open(p).size == (3 * 32, 2 * 32) for p in grids)


def test_two_ranks_give_the_same_update_as_one_rank_with_twice_the_batch(tiny_dataset, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    for cmd in ([sys.executable, "tests/ddp_step.py"], [TORCHRUN, "--standalone", "--nproc-per-node=2", "tests/ddp_step.py"]):
        out = one if cmd[0] == sys.executable else two
        proc = subprocess.run([*cmd, str(tiny_dataset), str(out)], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-4000:]
    start, a, b = load_file(str(one) + ".before"), load_file(str(one)), load_file(str(two))
    assert start.keys() == a.keys() == b.keys()
    for k in a:  # the update (the averaged gradient) agrees; float32 batch-size rounding is far below 1%
        da, db = a[k] - start[k], b[k] - start[k]
        assert da.norm() > 0, k
        assert (da - db).norm() <= 1e-2 * da.norm(), (k, float((da - db).norm() / da.norm()))


def test_ddp_accepts_micro_batches_without_a_reference_row(tmp_path):
    """A micro-batch whose every reference was dropped leaves the adapters out of the graph; DDP must still
    reduce (zero gradients), on one rank or on all of them."""
    out = tmp_path / "norms.json"
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", "tests/ddp_unused.py", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(out.read_text())
    assert sorted(found) == ["concat", "decoupled", "spatial_sum", "textual_sum"]
    for fusion, (mixed, none, every) in found.items():
        assert mixed > 0 and every > 0, fusion  # rank 1's rows trained the adapters; averaged into rank 0's
        assert none == 0.0, fusion


def test_a_corrupt_shard_is_skipped_and_counted_and_training_goes_on(tiny_dataset, tmp_path):
    ds = shutil.copytree(tiny_dataset, tmp_path / "ds")
    for tar in sorted((ds / "shards").glob("*.tar")):  # every shard cut short: the stream meets a cut early
        tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])
    proc = train(ds, tmp_path / "run", "--max-steps", 6)
    last = [line for line in proc.stdout.splitlines() if line.startswith("step 6/6")][0]
    assert int(last.rsplit("skipped", 1)[1]) >= 1
    assert "step 6 validation images" in proc.stdout or "no validation images" in proc.stdout


def test_bad_flags_say_what_to_do(tiny_dataset, tmp_path, capsys):
    from training.train import main

    common = ["--profile", "tiny", "--data", str(tiny_dataset)]
    assert main([*common, "--out", str(tmp_path / "x"), "--global-batch", "5"]) == 2
    assert "not a multiple" in capsys.readouterr().err
    assert main(["--profile", "tiny"]) == 2 and "--data" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "y"), "--resolution", "64"]) == 2  # tiny:sd15 works at 32 px
    assert "differs from tiny:sd15's own 32 px" in capsys.readouterr().err


PALETTE = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30)]


def colour_dataset(src: Path, dst: Path) -> Path:
    """The tiny dataset with each sample's target made a flat colour and its reference that colour on white,
    cycling through 4 colours; every caption the same. Only the reference tells the samples apart."""
    import io
    import tarfile

    import numpy as np

    shutil.copytree(src, dst)
    n = 0
    for path in sorted((dst / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        keys = sorted({name.split(".", 1)[0] for name, _ in members})
        colour = {k: np.array(PALETTE[(n + i) % len(PALETTE)], np.uint8) for i, k in enumerate(keys)}
        n += len(keys)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in members:
                key, suffix = name.split(".", 1)
                if suffix.startswith(("target", "reference")):
                    arr = np.broadcast_to(colour[key], (64, 64, 3)).copy()
                    if suffix.startswith("reference"):
                        arr[:12], arr[-12:], arr[:, :12], arr[:, -12:] = 255, 255, 255, 255
                    out = io.BytesIO()
                    Image.fromarray(arr).save(out, format="JPEG" if suffix.endswith("jpg") else "PNG", quality=95)
                    data = out.getvalue()
                elif suffix == "txt":
                    data = b"a photo"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        path.write_bytes(buf.getvalue())
    return dst


def reference_losses(run: Path | None, data: Path) -> dict[int, tuple[float, float]]:
    """{t: (loss with each sample's own reference cache, loss with the next sample's)}: 16 samples, the same
    noise for both, v-prediction targets."""
    from dreamcache.adapter import cache_kwargs, install_adapters, load_adapter_state, reference_features
    from training.data import DataConfig, TrainingSet, collate
    from training.shards import SampleIndex
    from training.models import load_models
    from training.step import Step
    from training.config import TrainConfig

    cfg = TrainConfig(base="tiny:sd21", resolution=32)
    device = torch.device("cpu")
    pipe, scheduler = load_models(cfg, device)
    unet = pipe.unet
    install_adapters(unet)
    if run is not None:
        load_adapter_state(unet, load_file(str(run / "adapters.safetensors")))
    step = Step(cfg, pipe, scheduler, device)
    # Measured on clean references (no jitter, no erasing): the question is whether the adapters use the
    # reference, not how well they see through augmentation noise.
    clean = DataConfig(resolution=32, jitter_p=0.0, erase_p=0.0)
    batch = collate(TrainingSet(SampleIndex.from_store(str(data)), clean, seed=123).__getitems__(list(range(16))))
    g = torch.Generator().manual_seed(0)
    out = {}
    with torch.no_grad():
        x0, ref = step.latents(batch["target"], None), step.latents(batch["reference"], None)
        text = step.encode_text(batch["caption"])
        own = reference_features(unet, unet.dreamcache_layers, scheduler, ref, torch.randn(ref.shape, generator=g),
                                 step.null)
        other = {k: v.roll(1, dims=0) for k, v in own.items()}
        for t in (500, 900):
            ts = torch.full((16,), t)
            noise = torch.randn(x0.shape, generator=g)
            noisy, goal = scheduler.add_noise(x0, noise, ts), scheduler.get_velocity(x0, noise, ts)
            losses = []
            for features in (own, other):
                pred = unet(noisy, ts, **text.kwargs(), cross_attention_kwargs=cache_kwargs(features)).sample
                losses.append(torch.nn.functional.mse_loss(pred, goal).item())
            out[t] = tuple(losses)
    return out


def test_the_adapters_learn_to_use_the_reference(tiny_dataset, tmp_path):
    """A short run on the tiny SD 2.1-style base (v-prediction, where knowing the image pays off at high noise)
    over data whose targets only the reference can tell apart: afterwards the loss with each sample's own
    cached reference is clearly lower than with another sample's. Untrained, the two are identical."""
    data = colour_dataset(tiny_dataset, tmp_path / "colours")
    before = reference_losses(None, data)
    assert all(own == other for own, other in before.values())  # W_proj = [I, 0]: the reference is ignored
    from training.train import main

    # LEARNING_TEST_REFERENCE_VIEWS=K: the same run on K reference views drawn in advance (--reference-latents)
    views = int(os.environ.get("LEARNING_TEST_REFERENCE_VIEWS", 0))
    if views:
        from training.encode import main as encode

        assert encode([str(data), "--base", "tiny:sd21", "--reference-views", str(views)]) == 0
    # The command in-process (its imports are this process's already): the point here is what it learns.
    assert main(["--profile", "tiny", "--data", str(data), "--out", str(tmp_path / "run"), "--base", "tiny:sd21",
                 "--max-steps", "200", "--lr", "1e-2", "--global-batch", "8", "--micro-batch", "8",
                 "--checkpoint-every", "200", "--val-samples", "0", "--log-every", "100",
                 "--seed", os.environ.get("LEARNING_TEST_SEED", "0"), *(["--reference-latents"] if views else [])]) == 0
    after = reference_losses(tmp_path / "run", data)
    for t, (own, other) in after.items():
        print(f"t={t}: own {own:.4f}, other {other:.4f} ({1 - own / other:.1%} lower)")
        # Measured 3.2-6.0% lower over seeds 0 and 1 (LEARNING_TEST_SEED) with the official reference
        # augmentation, 4.4% and 6.1% (seed 0) with fused AdamW; with 8 views drawn in advance
        # (LEARNING_TEST_REFERENCE_VIEWS=8) 3.7% and 5.2%. Exactly equal before training, and for adapters that
        # ignore the reference.
        assert own < 0.98 * other, (t, own, other)


def test_a_step_reads_nothing_back_from_the_device_but_on_logging_steps(tiny_dataset, tmp_path, monkeypatch):
    """The loop's loss stays on the device: the trainer's own reads of a tensor (item, float, int, bool) do not
    grow with the steps between two logging steps."""
    from training.train import main

    calls = []
    for name in ("item", "__float__", "__int__", "__bool__"):
        def read(self, real=getattr(torch.Tensor, name), name=name):
            where = sys._getframe(1).f_code.co_filename
            if f"{os.sep}training{os.sep}" in where:
                calls.append((name, Path(where).name, sys._getframe(1).f_lineno))
            return real(self)
        monkeypatch.setattr(torch.Tensor, name, read)
    counts = []
    for steps in (2, 6):
        calls.clear()
        assert main(["--profile", "tiny", "--data", str(tiny_dataset), "--out", str(tmp_path / f"run{steps}"),
                     "--max-steps", str(steps), "--log-every", str(steps), "--checkpoint-every", str(steps),
                     "--val-samples", "0"]) == 0
        counts.append(sorted(calls))
    assert counts[0] == counts[1], counts


def test_compile_trains_with_one_graph_per_step_on_one_and_two_ranks(tiny_dataset, tmp_path):
    """--compile (aot_eager here: no code generation on CPU) through the command, alone and under DDP with
    gradient accumulation: the graphs of the first step serve every later step."""
    for nproc, extra in ((None, ()), (2, ("--global-batch", 8))):
        proc = train(tiny_dataset, tmp_path / f"run{nproc}", "--max-steps", 4, "--compile", "--set",
                     "compile_backend=aot_eager", "--val-samples", 0, *extra, nproc=nproc)
        assert "torch.compile: 2 graph(s) for the training step (aot_eager)" in proc.stdout, proc.stdout
        assert "; 0 compiled after the first step" in proc.stdout and "warning: torch.compile" not in proc.stdout
        assert load_file(tmp_path / f"run{nproc}" / "adapters.safetensors")
