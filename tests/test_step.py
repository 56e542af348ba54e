"""The trainer's micro-batch (``training.step.Step``) in process: gradient checkpointing and bf16 frozen weights."""

import pytest
import torch

from dreamcache.adapter import FUSIONS, adapter_modules, install_adapters, reference_features, trainable_parameters
from dreamcache.bases import SD_LAYERS
from training.config import TINY, TrainConfig
from training.models import load_models
from training.step import Step


def trainer(dtype=torch.float32, **config):
    cfg = TrainConfig(**{**TINY, **config})
    pipe, scheduler = load_models(cfg, torch.device("cpu"))
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.to(dtype)
    unet = pipe.unet
    install_adapters(unet, cfg.layers or SD_LAYERS, cfg.fusion)
    params = trainable_parameters(unet)
    torch.manual_seed(0)
    for p in params:  # fp32 adapters, "trained" (W_proj no longer [I, 0]), as in the trainer
        p.data = p.data.float().normal_(0, 0.02)
    return Step(cfg, pipe, scheduler, torch.device("cpu")), unet, params


def batch(n: int, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"key": [f"s0-{i:08d}" for i in range(n)], "caption": [f"a red cup on table {i}" for i in range(n)],
            "subject": ["a red cup"] * n,
            "target": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
            "reference": torch.rand(n, 3, size, size, generator=g) * 2 - 1}


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_gradient_checkpointing_gives_the_same_loss_and_adapter_gradients(fusion):
    step, unet, params = trainer(fusion=fusion)
    calls = []
    for proc in adapter_modules(unet).values():  # every fusion's W_V runs once per conditioned pass
        proc.to_v.register_forward_hook(lambda *_: calls.append(1))
    data = batch(4)
    plain = step.loss(unet, data, step=3, backward_scale=1.0)
    grads = [p.grad.clone() for p in params]
    plain_calls = len(calls)
    for p in params:
        p.grad = None
    unet.enable_gradient_checkpointing()
    checkpointed = step.loss(unet, data, step=3, backward_scale=1.0)
    assert len(calls) - plain_calls > plain_calls  # the adapters' blocks ran again during backward
    assert torch.allclose(checkpointed, plain, rtol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def test_bf16_frozen_weights_train_fp32_adapters():
    step, unet, params = trainer(torch.bfloat16)
    loss = step.loss(unet, batch(2), step=0, backward_scale=1.0)
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("template", ["", "a photo of {subject}", "{caption}"])
def test_the_caching_pass_uses_the_cache_prompt(template, monkeypatch):
    """Table 6's ablation: the reference is cached with a text prompt, the template filled per sample."""
    step, unet, _ = trainer(cache_prompt=template)
    data = batch(2)
    captions = step.encode_text(data["caption"])
    got = step.cache_text(data, captions)
    want = {"": step.encode_text([""]), "a photo of {subject}": step.encode_text(["a photo of a red cup"] * 2),
            "{caption}": step.encode_text(data["caption"])}[template]
    assert torch.equal(got.embeds.expand_as(want.embeds), want.embeds)
    seen = []

    def record(*args):
        seen.append(args[5])  # the condition the caching pass runs with
        return reference_features(*args)

    monkeypatch.setattr("training.step.reference_features", record)
    step.loss(unet, data, step=0)
    assert torch.equal(seen[0].embeds.expand_as(want.embeds), want.embeds)


def test_the_ablation_flags_are_checked(capsys):
    from training.train import main
    from training.config import parse_args

    cfg, _ = parse_args(["--fusion", "decoupled", "--cache-prompt", "{caption}", "--cache-timestep", "500"])
    assert (cfg.fusion, cfg.cache_prompt, cfg.cache_timestep) == ("decoupled", "{caption}", 500)
    for flags, message in ((["--fusion", "sum"], "--fusion must be one of concat, spatial_sum, textual_sum, decoupled"),
                           (["--cache-prompt", "a photo of {noun}"], "unknown field(s) noun"),
                           (["--cache-prompt", "a {subject"], "not a valid template")):
        assert main([*flags, "--dry-run", "--random-init"]) == 2
        assert message in capsys.readouterr().err


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    from dreamcache.store import Store
    from training.checkpoints import newest_checkpoint, prune_checkpoints

    for step in (2, 4, 6, 8):
        folder = tmp_path / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        if step != 8:  # step 8 is still being written: not a checkpoint, never counted or deleted
            (folder / "COMPLETE").write_text("ok\n")
    store = Store(str(tmp_path))
    assert prune_checkpoints(store, keep=2) == ["step-00000002"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000006", "step-00000008"]
    assert newest_checkpoint(store) == "step-00000006"


def test_k_reference_views_train_on_the_union_of_their_tokens(monkeypatch):
    """--references 2: each sample's two augmented views are cached and concatenated per layer, the first view's
    tokens as a single view would have them (same noise draw); every adapter still gets a gradient."""
    import training.step as step_module

    step, unet, params = trainer(references=2)
    data = batch(2)
    single = step_module.cache_kwargs
    seen = []

    def record(features, active=None, static=False):
        seen.append({k: v.clone() for k, v in features.items()})
        return single(features, active, static)

    monkeypatch.setattr(step_module, "cache_kwargs", record)
    one_view = step.loss(unet, data, step=3, dropout=False)
    two = {**data, "reference": torch.stack([data["reference"], data["reference"].flip(-1)], dim=1)}  # (B, 2, 3, R, R)
    loss = step.loss(unet, two, step=3, dropout=False, backward_scale=1.0)
    assert torch.isfinite(loss) and not torch.equal(loss, one_view)
    for layer, f in seen[0].items():
        g = seen[1][layer]
        assert g.shape == (2, 2 * f.shape[1], f.shape[2])
        torch.testing.assert_close(g[:, :f.shape[1]], f, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(g[:, f.shape[1]:], f, atol=1e-3)  # the flipped view's tokens
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.slow  # the pipeline's tiny dataset
def test_the_loader_gives_k_independent_views_of_each_reference(tiny_dataset):
    import random

    from dreamcache.store import Store
    from manifests.schema import SHARDS, read_manifests, tar_members
    from training.data import DataConfig, collate, decode_sample

    store = Store(str(tiny_dataset))
    members = tar_members(store.read_bytes(SHARDS, read_manifests(store)[0].shard))
    keys = sorted(members)[:2]
    samples = [decode_sample({"__key__": k, **members[k]}, DataConfig(resolution=32, views=3), random.Random(k))
               for k in keys]
    batch = collate(samples)
    assert batch["reference"].shape == (2, 3, 3, 32, 32)
    assert not torch.equal(batch["reference"][0, 0], batch["reference"][0, 1])  # augmented independently
    one = decode_sample({"__key__": keys[0], **members[keys[0]]}, DataConfig(resolution=32), random.Random(keys[0]))
    assert torch.equal(one["reference"], batch["reference"][0, 0])  # the first view is the single view


@pytest.mark.parametrize("fusion", ["concat", "decoupled"])
def test_rows_as_a_mask_give_the_loss_and_gradients_of_rows_as_an_index(fusion, monkeypatch):
    """--compile's static rows (every row fused, the others masked) against the index of the conditioned rows:
    the same loss and adapter gradients, with some rows without the reference and with none."""
    import training.step

    patterns = set()
    real = training.step.cache_kwargs
    monkeypatch.setattr(training.step, "cache_kwargs",
                        lambda f, active, static: patterns.add(tuple(active.tolist())) or real(f, active, static))
    for drop_image, at in ((0.3, 1), (0.92, 3)):  # some rows without the reference; then none with it
        results = []
        for static in (False, True):
            step, unet, params = trainer(fusion=fusion, drop_image=drop_image, compile=static)
            loss = step.loss(unet, batch(4), step=at, backward_scale=1.0)
            results.append((loss.detach(), [p.grad.clone() for p in params]))
        (loss, grads), (masked, masked_grads) = results
        torch.testing.assert_close(masked, loss, rtol=1e-6, atol=0)
        for g, h in zip(grads, masked_grads):
            torch.testing.assert_close(h, g, rtol=1e-5, atol=1e-8)
    assert (False,) * 4 in patterns and any(0 < sum(p) < 4 for p in patterns)


def test_the_compiled_step_matches_eager_and_compiles_once(monkeypatch):
    """--compile (aot_eager: dynamo's graphs on the eager kernels, no C++ compiler needed): the loss and the
    adapter gradients of eager within 1e-5, and no graph after the first step while the conditioned rows and
    the dropped captions change from step to step."""
    import training.step
    from torch._dynamo.utils import counters

    from training.models import compile_training, compiled_graphs

    patterns = []
    real = training.step.cache_kwargs
    monkeypatch.setattr(training.step, "cache_kwargs",
                        lambda f, active, static: patterns.append(tuple(active.tolist())) or real(f, active, static))
    config = dict(drop_image=0.4, drop_text=0.3)
    eager_step, eager_unet, eager_params = trainer(**config)  # eager throughout: VAE, U-Net, rows as an index
    step, unet, params = trainer(**config, compile=True, compile_backend="aot_eager")
    compiled = compile_training(unet, "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    for k in range(5):
        data = batch(4)
        data["key"] = [f"s{k}-{i:08d}" for i in range(4)]
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            loss = step.loss(compiled, data, step=k, backward_scale=1.0)
        if k == 0:
            graphs = compiled_graphs()
        want = eager_step.loss(eager_unet, data, step=k, backward_scale=1.0)
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=0)
        for p, q in zip(params, eager_params):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
            p.grad = q.grad = None
    assert compiled_graphs() == graphs == 2  # the U-Net's training pass and the VAE's encode
    images = patterns[::2]  # the compiled step's patterns (each step ran compiled, then eager)
    assert len(set(images)) > 1  # the conditioned rows did change from step to step


def test_channels_last_gives_the_loss_and_gradients_of_the_default_layout():
    """--set channels_last=true: the U-Net and VAE in channels-last memory and the images encoded in it, the
    same loss and adapter gradients (to float rounding), the references encoded at every step and cached alike."""
    results = []
    for channels_last in (False, True):
        step, unet, params = trainer(channels_last=channels_last)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        data = batch(3)
        loss = step.loss(unet, data, step=2, backward_scale=1.0)
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (loss, grads), (nhwc, nhwc_grads) = results
    torch.testing.assert_close(nhwc, loss, rtol=1e-5, atol=0)
    for g, h in zip(grads, nhwc_grads):
        torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-7)
