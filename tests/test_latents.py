"""The target latent cache (python -m training.encode): written once, used by the loader and the trainer's step."""

import io
import json
import shutil
import tarfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training.data import DataConfig, TrainingSet, UnreadableData, collate, shard_urls
from training.encode import cache_name, find_cache, load_vae, main as encode
from training.shards import SampleIndex

pytestmark = pytest.mark.slow  # needs the pipeline's tiny dataset


@pytest.fixture(scope="module")
def encoded(tiny_dataset, tmp_path_factory):
    ds = shutil.copytree(tiny_dataset, tmp_path_factory.mktemp("latents") / "ds")
    assert encode([str(ds), "--base", "tiny:sd15", "--batch-size", "5"]) == 0
    return ds


def samples(ds, cfg, seed, n):
    return TrainingSet(SampleIndex.from_store(str(ds)), cfg, seed).__getitems__(list(range(n)))


def corrupt_targets(ds):
    """Every target replaced by a shorter non-image: the members move, so the shards no longer match their
    manifests (the loader reads them through their own headers)."""
    for path in (ds / "shards").glob("*.tar"):
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(path, "w") as tar:
            for info, data in members:
                data = b"not a jpeg" if info.name.endswith(".target.jpg") else data
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_encode_writes_every_shard_once_and_resumes(encoded, capsys):
    folder = encoded / "latents" / cache_name("tiny:sd15", 32)
    assert sorted(p.name for p in folder.iterdir()) == [f"shard-00000{i}.safetensors" for i in range(3)]
    stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    (folder / "shard-000001.safetensors").unlink()  # an interrupted encode
    capsys.readouterr()
    assert encode([str(encoded), "--base", "tiny:sd15"]) == 0
    assert "3 shards, 2 already encoded" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.exists() and "000001" not in p.name)


def test_the_loader_uses_the_cache_and_does_not_decode_targets(encoded, tmp_path):
    vae, resolution = load_vae("tiny:sd15", "cpu")
    urls = shard_urls(str(encoded))
    folder, message = find_cache(str(encoded), "tiny:sd15", resolution, vae, urls)
    assert folder and "using" in message
    ds = shutil.copytree(encoded, tmp_path / "ds")
    corrupt_targets(ds)  # only the cache can give targets now
    cfg = DataConfig(resolution=32, latents=folder.replace(str(encoded), str(ds)))
    got = samples(ds, cfg, 0, 48)
    assert all(s["skipped"] == 0 and "target" not in s for s in got)  # every sample, from the cache
    rows = {}  # the rows read by range are the file's own
    for path in sorted((ds / "latents" / cache_name("tiny:sd15", 32)).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            keys = json.loads(f.metadata()["keys"])
        tensors = load_file(str(path))
        rows.update({k: (tensors["mean"][i], tensors["std"][i]) for i, k in enumerate(keys)})
    assert len(rows) == 48 and all(torch.equal(s["target_mean"], rows[s["key"]][0]) and
                                   torch.equal(s["target_std"], rows[s["key"]][1]) for s in got)
    batch = collate(got[:4])
    assert batch["target_mean"].shape == batch["target_std"].shape == (4, 4, 16, 16)
    assert batch["target_mean"].dtype == torch.float16
    without = DataConfig(resolution=32, max_unreadable=40)  # no target decodes: it stops
    with pytest.raises(UnreadableData, match="40 samples in a row could not be read, .*UnidentifiedImageError"):
        samples(ds, without, 0, 1)


def test_the_step_gives_the_same_loss_from_the_cache(encoded):
    from dreamcache.adapter import install_adapters, trainable_parameters
    from training.config import TINY, TrainConfig
    from training.models import load_models
    from training.step import Step

    cfg = TrainConfig(**TINY)
    pipe, scheduler = load_models(cfg, torch.device("cpu"))
    unet = pipe.unet
    install_adapters(unet)
    trainable_parameters(unet)
    step = Step(cfg, pipe, scheduler, torch.device("cpu"))
    folder, _ = find_cache(str(encoded), "tiny:sd15", 32, pipe.vae, shard_urls(str(encoded)))
    plain = DataConfig(resolution=32, erase_p=0, jitter_p=0, flip_p=0, min_side=1.0)
    cached = DataConfig(**{**plain.__dict__, "latents": folder})
    a, b = collate(samples(encoded, plain, 5, 4)), collate(samples(encoded, cached, 5, 4))
    assert a["key"] == b["key"]
    with torch.no_grad():
        want, got = step.loss(unet, a, 7).item(), step.loss(unet, b, 7).item()
    assert got == pytest.approx(want, rel=2e-3)  # fp16 storage of the latent distribution


def test_a_cache_that_does_not_cover_the_data_or_another_vae_is_not_used(encoded, tmp_path, capsys):
    from diffusers import AutoencoderKL
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    vae, resolution = load_vae("tiny:sd15", "cpu")
    ds = shutil.copytree(encoded, tmp_path / "ds")
    urls = shard_urls(str(ds))
    other = AutoencoderKL.from_config({**vae.config, "scaling_factor": 0.5})
    folder, message = find_cache(str(ds), "tiny:sd15", resolution, other, urls)
    assert folder is None and message == (f"none for tiny:sd15 at 32 px with this VAE; encoding targets on the fly "
                                          f"(python -m training.encode {ds} --base tiny:sd15 writes one)")
    assert find_cache(str(ds), "tiny:sd21", resolution, vae, urls)[0] is None  # another base: another folder

    stale = ds / "latents" / cache_name("tiny:sd15", 32) / "shard-000002.safetensors"
    with safe_open(str(stale), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(stale)), str(stale), metadata={**meta, "vae": "0" * 16})  # one file, another VAE
    folder, message = find_cache(str(ds), "tiny:sd15", resolution, vae, urls)
    assert folder is None and "covers 2 of 3 shards" in message
    capsys.readouterr()
    assert encode([str(ds), "--base", "tiny:sd15"]) == 0  # redoes that shard only
    assert "3 shards, 2 already encoded" in capsys.readouterr().out
    assert find_cache(str(ds), "tiny:sd15", resolution, vae, urls)[0]


@pytest.fixture(scope="module")
def with_views(tiny_dataset, tmp_path_factory):
    ds = shutil.copytree(tiny_dataset, tmp_path_factory.mktemp("views") / "ds")
    assert encode([str(ds), "--base", "tiny:sd15", "--batch-size", "5", "--reference-views", "3"]) == 0
    return ds


def corrupt_references(ds):
    """Every reference image replaced by a non-image: only the cached views can give references now."""
    for path in (ds / "shards").glob("*.tar"):
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(path, "w") as tar:
            for info, data in members:
                data = b"not an image" if ".reference." in info.name else data
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_reference_views_are_the_augmentation_drawn_in_advance_and_the_loader_picks_among_them(with_views, tmp_path):
    """--reference-views K: view k of a sample is the VAE mean of the trainer's own augmentation drawn from
    (key, k); the loader (reference_views=K) gives one of a sample's K cached views, drawn per position, and
    reads no reference image."""
    from PIL import Image

    from dreamcache.images import on_white
    from training.encode import reference_view, reference_views

    vae, resolution = load_vae("tiny:sd15", "cpu")
    urls = shard_urls(str(with_views))
    assert reference_views(str(with_views), "tiny:sd15", resolution, vae, urls) == 3
    folder, _ = find_cache(str(with_views), "tiny:sd15", resolution, vae, urls)  # targets still served
    path = with_views / "latents" / cache_name("tiny:sd15", 32) / "shard-000000.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = json.loads(f.metadata()["keys"])
        views = f.get_tensor("references")
    assert views.shape == (len(keys), 3, 4, 16, 16) and views.dtype == torch.float16
    with tarfile.open(with_views / "shards" / "shard-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(keys[0] + ".reference."))
        reference = on_white(Image.open(io.BytesIO(tar.extractfile(member).read())))
    with torch.no_grad():
        for k in range(3):
            want = vae.encode(reference_view(reference, keys[0], k, 32)[None]).latent_dist.mean[0]
            torch.testing.assert_close(views[0, k].float(), want, rtol=0, atol=2e-3)  # fp16 storage
    assert not torch.equal(views[0, 0], views[0, 1])  # independent draws

    ds = shutil.copytree(with_views, tmp_path / "ds")
    corrupt_references(ds)
    cfg = DataConfig(resolution=32, latents=folder.replace(str(with_views), str(ds)), reference_views=3)
    got = samples(ds, cfg, 0, 48)
    assert all(s["skipped"] == 0 and "reference" not in s for s in got)
    rows = {}
    for p in sorted((ds / "latents" / cache_name("tiny:sd15", 32)).glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            rows.update(zip(json.loads(f.metadata()["keys"]), f.get_tensor("references")))
    picked = [next(k for k in range(3) if torch.equal(s["reference_latent"], rows[s["key"]][k])) for s in got]
    assert set(picked) == {0, 1, 2}  # every view is drawn somewhere
    two = DataConfig(**{**cfg.__dict__, "views": 2})  # K views per sample (--references 2): two picks
    batch = collate(samples(ds, two, 0, 4))
    assert batch["reference_latent"].shape == (4, 2, 4, 16, 16) and "reference" not in batch
    with pytest.raises(UnreadableData):  # without the cached views the corrupt references stop the loader
        samples(ds, DataConfig(resolution=32, latents=cfg.latents, max_unreadable=5), 0, 1)


def test_reference_latents_train_from_the_cached_views_and_are_refused_without_them(with_views, encoded, tmp_path,
                                                                                   capsys):
    from training.train import main

    common = ["--profile", "tiny", "--max-steps", "2", "--val-samples", "0"]
    assert main([*common, "--data", str(encoded), "--out", str(tmp_path / "a"), "--reference-latents"]) == 2
    assert "--reference-views K" in capsys.readouterr().err  # a cache of targets only
    assert main([*common, "--data", str(with_views), "--out", str(tmp_path / "b"), "--reference-latents",
                 "--no-latents"]) == 2
    assert "--no-latents" in capsys.readouterr().err
    assert main([*common, "--data", str(with_views), "--out", str(tmp_path / "c"), "--reference-latents"]) == 0
    out = capsys.readouterr().out
    assert "reference views: 3 per sample, drawn in advance" in out and "step 2/2" in out


def test_the_step_gives_the_loss_of_the_view_it_was_handed(with_views):
    """A micro-batch with cached reference views gives the loss of the same views augmented and encoded in the
    step (fp16 storage apart)."""
    from PIL import Image

    from dreamcache.adapter import install_adapters, trainable_parameters
    from dreamcache.images import on_white
    from training.config import TINY, TrainConfig
    from training.encode import reference_view
    from training.models import load_models
    from training.step import Step

    cfg = TrainConfig(**TINY)
    pipe, scheduler = load_models(cfg, torch.device("cpu"))
    install_adapters(pipe.unet)
    for p in trainable_parameters(pipe.unet):  # adapters that read the reference
        p.data.normal_(0, 0.05)
    step = Step(cfg, pipe, scheduler, torch.device("cpu"))
    folder, _ = find_cache(str(with_views), "tiny:sd15", 32, pipe.vae, shard_urls(str(with_views)))
    cached = collate(samples(with_views, DataConfig(resolution=32, latents=folder, reference_views=3), 5, 4))
    rows, images = {}, {}
    for p in sorted((with_views / "latents" / cache_name("tiny:sd15", 32)).glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            rows.update(zip(json.loads(f.metadata()["keys"]), f.get_tensor("references")))
    for tar_path in sorted((with_views / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key = m.name.split(".")[0]
                if key in cached["key"] and ".reference." in m.name:
                    images[key] = on_white(Image.open(io.BytesIO(tar.extractfile(m).read())))
    picks = [next(k for k in range(3) if torch.equal(v, rows[key][k]))
             for key, v in zip(cached["key"], cached["reference_latent"])]
    pixels = {k: v for k, v in cached.items() if k != "reference_latent"}
    pixels["reference"] = torch.stack([reference_view(images[key], key, k, 32) for key, k in zip(cached["key"], picks)])
    with torch.no_grad():
        want, got = step.loss(pipe.unet, pixels, 7).item(), step.loss(pipe.unet, cached, 7).item()
    assert got == pytest.approx(want, rel=2e-3)
