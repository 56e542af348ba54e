"""DreamCache adapters on a tiny U-Net with SD 1.5's block layout (so the paper's layer names exist)."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from dreamcache.adapter import (DEFAULT_LAYERS, FUSIONS, PREFIX, adapter_modules, adapter_state_dict, cache_kwargs,
                                capture_features, install_adapters, load_adapter_state, remove_adapters, save_adapters,
                                trainable_parameters)


def tiny_unet():
    """The tiny profile's SD 1.5-layout U-Net (block_out_channels 32, 32, 64, 64), fresh from disk."""
    from dreamcache.tiny import ensure_tiny_models

    return UNet2DConditionModel.from_pretrained(ensure_tiny_models(names=("sd15",))["sd15"], subfolder="unet").eval()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    text = torch.randn(2, 7, 32, generator=g)
    ref = torch.randn(2, 4, 16, 16, generator=g)
    return x, t, text, ref


def out(unet, x, t, text, feats=None, active=None):
    """The U-Net's prediction, conditioned on the cache ``feats`` in the rows where ``active`` when given."""
    with torch.no_grad():
        return call(unet, x, t, text, feats, active)


def call(unet, x, t, text, feats=None, active=None):
    extra = {} if feats is None else {"cross_attention_kwargs": cache_kwargs(feats, active)}
    return unet(x, t, encoder_hidden_states=text, **extra).sample


def test_swapping_processors_in_and_out_is_bit_identical(inputs):
    x, t, text, _ = inputs
    unet = tiny_unet()
    original = unet.attn_processors
    base = out(unet, x, t, text)
    install_adapters(unet)
    assert all(unet.attn_processors[k] is not p for k, p in original.items())  # every attention takes the cache
    assert torch.equal(out(unet, x, t, text), base)  # installed, no reference: the original layers exactly
    remove_adapters(unet)
    assert torch.equal(out(unet, x, t, text), base)
    assert all(unet.attn_processors[k] is p for k, p in original.items())  # the original processors themselves


def test_cache_holds_the_input_of_each_selected_transformer(inputs):
    x, t, text, ref = inputs
    unet = tiny_unet()
    feats = capture_features(unet, DEFAULT_LAYERS, ref, torch.tensor([1, 1]), torch.zeros_like(text))
    # 16x16 latent: mid 2x2 (64 ch), up1 4x4 (64), up2 8x8 (32 ch in this toy: block_out_channels[1]), up3 16x16
    shapes = {k: tuple(v.shape) for k, v in feats.items()}
    assert shapes == {"mid_block.attentions.0": (2, 4, 64), "up_blocks.1.attentions.1": (2, 16, 64),
                      "up_blocks.2.attentions.0": (2, 64, 32), "up_blocks.2.attentions.2": (2, 64, 32),
                      "up_blocks.3.attentions.1": (2, 256, 32)}


def test_only_adapters_train_and_only_adapters_are_saved(inputs, tmp_path):
    x, t, text, ref = inputs
    unet = tiny_unet()
    install_adapters(unet)
    params = trainable_parameters(unet)
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in params}
    for p in params:
        p.data.normal_(0, 0.05)
    path = tmp_path / "adapters.safetensors"
    save_adapters(unet, str(path), {"base": "toy", "step": "7"})
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(PREFIX) for k in keys)
    assert json.loads(meta["layers"]) == list(DEFAULT_LAYERS) and meta["step"] == "7"
    assert json.loads(meta["dims"])["mid_block.attentions.0"] == 64
    fresh = tiny_unet()
    install_adapters(fresh)
    from safetensors.torch import load_file

    load_adapter_state(fresh, load_file(str(path)))
    feats = capture_features(unet, DEFAULT_LAYERS, ref, torch.tensor([1, 1]), torch.zeros_like(text))
    assert torch.equal(out(unet, x, t, text, feats), out(fresh, x, t, text, feats))
    other = tiny_unet()
    install_adapters(other, DEFAULT_LAYERS[:2])
    with pytest.raises(ValueError, match="do not match"):
        load_adapter_state(other, load_file(str(path)))


def test_gradients_reach_only_the_adapters(inputs):
    x, t, text, ref = inputs
    unet = tiny_unet()
    install_adapters(unet)
    params = trainable_parameters(unet)
    feats = capture_features(unet, DEFAULT_LAYERS, ref, torch.tensor([1, 1]), torch.zeros_like(text))
    unet.train()
    call(unet, x, t, text, feats).square().mean().backward()
    assert all(p.grad is not None for p in params)
    w_proj = [p for n, p in adapter_state_dict(unet).items() if n.endswith("proj.weight")]
    assert len(w_proj) == len(DEFAULT_LAYERS) and all(p.grad.abs().sum() > 0 for p in w_proj)
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)


# Per block of width C: concat 6 C^2 + 4 C (the official code's count, its own query LayerNorm included);
# spatial sum and decoupled 4 C^2 + 3 C (no W_proj); textual sum 2 C^2 (W_K, W_V on the frozen attn2). SD 1.5's
# adapted blocks: C = 1280, 1280, 640, 640, 320.
PARAMETERS = {"concat": 25_207_040, "spatial_sum": 16_806_080, "textual_sum": 8_396_800, "decoupled": 16_806_080}


@pytest.mark.parametrize("base,fusion", [("sd15", "concat"), ("sd21", "concat"), ("sd15", "spatial_sum"),
                                         ("sd15", "textual_sum"), ("sd15", "decoupled")])
def test_dry_run_counts_the_papers_25m_adapter_parameters(base, fusion, capsys):
    from training.train import main

    assert main(["--base", base, "--random-init", "--dry-run", "--fusion", fusion]) == 0  # the command, in-process
    stdout = capsys.readouterr().out
    assert f"fusion: {fusion}; caching pass: prompt empty" in stdout
    n = int(stdout.split("adapter parameters:")[1].split()[0].replace(",", ""))
    assert n == PARAMETERS[fusion]
    frozen = int(stdout.split("frozen U-Net parameters:")[1].split()[0].replace(",", ""))
    assert frozen == {"sd15": 859_520_964, "sd21": 865_910_724}[base]  # the released U-Nets' sizes
    if base == "sd21":  # SD 2.1-base: 512 px, not the 768 px SD 2.1
        from dreamcache.bases import CONFIGS, SPECS

        assert SPECS["sd21"].checkpoint == "stabilityai/stable-diffusion-2-1-base"
        assert json.loads((CONFIGS / "sd21_unet.json").read_text())["sample_size"] == 64
    values = int(stdout.split("512 px:")[1].split()[0].replace(",", ""))
    assert values == 3_031_040  # same layers and channels on both: ~3.0M values, 6 MB in fp16 (SPEC sec. 3)


def test_caching_pass_stops_at_the_last_layer_with_the_features_of_a_full_pass(inputs):
    x, t, text, ref = inputs
    unet = tiny_unet()
    full = {}
    for layer in DEFAULT_LAYERS:  # the inputs a whole pass gives each layer
        unet.get_submodule(layer).register_forward_pre_hook(
            lambda m, a, k, layer=layer: full.__setitem__(layer, (a[0] if a else k["hidden_states"]).flatten(2).transpose(1, 2)),
            with_kwargs=True)
    with torch.no_grad():
        unet(ref, torch.tensor([1, 1]), encoder_hidden_states=torch.zeros_like(text))
    ran = []
    unet.conv_out.register_forward_hook(lambda *_: ran.append("conv_out"))
    unet.get_submodule("up_blocks.3.attentions.2").register_forward_hook(lambda *_: ran.append("last transformer"))
    feats = capture_features(unet, DEFAULT_LAYERS, ref, torch.tensor([1, 1]), torch.zeros_like(text))
    assert ran == []  # nothing after the last selected layer's input ran
    assert feats.keys() == full.keys() and all(torch.equal(feats[k], full[k]) for k in full)


def test_the_query_is_the_adapters_own_norm_of_the_block_input(inputs):
    x, t, text, ref = inputs
    unet = tiny_unet()
    install_adapters(unet)
    name, proc = next(iter(adapter_modules(unet).items()))
    block = unet.get_submodule(name.rsplit(".attn1.processor", 1)[0])
    seen = {}
    block.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("block", a[0] if a else k["hidden_states"]),
                                    with_kwargs=True)
    proc.norm.register_forward_hook(lambda m, a, o: seen.__setitem__("norm", a[0]))
    feats = capture_features(unet, DEFAULT_LAYERS, ref, torch.tensor([1, 1]), torch.zeros_like(text))
    out(unet, x, t, text, feats)
    assert torch.equal(seen["norm"], seen["block"])  # not the block's norm1 output
    assert {n.rsplit(".", 2)[-2] for n in adapter_state_dict(unet) if name in n} == {
        "to_q", "to_k", "to_v", "to_out", "proj", "norm"}


def test_adapters_take_the_dtype_of_the_unet_they_are_installed_in():
    unet = tiny_unet().to(torch.bfloat16)
    install_adapters(unet)
    assert {p.dtype for p in adapter_state_dict(unet).values()} == {torch.bfloat16}
    remove_adapters(unet)
    assert not any(block._forward_pre_hooks for block in unet.modules() if type(block).__name__ == "BasicTransformerBlock")


def manual_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, written out."""
    B, N, C = q.shape
    q, k, v = (z.reshape(B, -1, heads, C // heads).transpose(1, 2) for z in (q, k, v))
    w = (q @ k.transpose(-1, -2) / (C // heads) ** 0.5).softmax(-1)
    return (w @ v).transpose(1, 2).reshape(B, N, C)


def perturbed(unet, seed=3):
    """Adapters moved off their identity initialisation ("trained")."""
    torch.manual_seed(seed)
    for p in adapter_state_dict(unet).values():
        p.data.normal_(0, 0.05)


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_every_fusion_is_plug_and_play(inputs, fusion):
    """Exact without a cache, the identity untrained, exact on rows without a reference, trainable, removable."""
    x, t, text, ref = inputs
    unet = tiny_unet()
    base = out(unet, x, t, text)
    install_adapters(unet, fusion=fusion)
    assert torch.equal(out(unet, x, t, text), base)
    feats = capture_features(unet, DEFAULT_LAYERS, ref, torch.tensor([1, 1]), torch.zeros_like(text))
    assert torch.allclose(out(unet, x, t, text, feats), base, atol=1e-5)
    perturbed(unet)
    conditioned = out(unet, x, t, text, feats)
    assert (conditioned - base).abs().max() > 1e-3
    mixed = out(unet, x, t, text, feats, active=[True, False])
    assert torch.equal(mixed[1], base[1]) and torch.allclose(mixed[0], conditioned[0], atol=1e-5)
    assert torch.equal(out(unet, x, t, text, feats, active=[False, False]), base)
    assert (out(unet, x, t, text, {k: v.flip(0) for k, v in feats.items()}) - conditioned).abs().max() > 1e-3
    one = {k: v[:1] for k, v in feats.items()}  # one reference's cache, shared by every row
    shared = out(unet, x, t, text, one)
    assert torch.allclose(shared[0], conditioned[0], atol=1e-5) and (shared[1] - conditioned[1]).abs().max() > 1e-3
    params = trainable_parameters(unet)
    call(unet, x, t, text, feats).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    remove_adapters(unet)
    assert torch.equal(out(unet, x, t, text), base)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in unet.modules())


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_rows_as_an_index_a_slice_or_a_mask_give_the_same_prediction(inputs, fusion):
    """The three ways a call names its conditioned rows: indices (cache_kwargs), a block of rows (guidance's
    slice: views, no gather or scatter) and a mask (a compiled training step's fixed shapes)."""
    from dreamcache.adapter import CACHE_KEY, CacheInputs

    x, t, text, ref = (torch.cat([v, v.flip(0)]) for v in inputs)  # four rows
    unet = tiny_unet()
    install_adapters(unet, fusion=fusion)
    perturbed(unet)
    feats = capture_features(unet, DEFAULT_LAYERS, ref, torch.ones(4, dtype=torch.long), torch.zeros_like(text))
    one = {k: v[:1] for k, v in feats.items()}
    for f in (feats, one):  # a reference per row, or one shared
        index = out(unet, x, t, text, f, active=[False, True, True, False])
        for rows in (slice(1, 3), torch.tensor([1, 2])):
            with torch.no_grad():
                got = unet(x, t, encoder_hidden_states=text,
                           cross_attention_kwargs={CACHE_KEY: CacheInputs(f, rows)}).sample
            assert torch.equal(got, index), rows
        with torch.no_grad():
            masked = unet(x, t, encoder_hidden_states=text,
                          cross_attention_kwargs=cache_kwargs(f, [False, True, True, False], static=True)).sample
        torch.testing.assert_close(masked, index, rtol=1e-5, atol=1e-6)
        assert torch.equal(masked[0], index[0]) and torch.equal(masked[3], index[3])


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_each_fusion_computes_its_formula(inputs, fusion):
    """The mid block's adapter, against its formula written out: what enters and leaves the attention it
    sits on and the transformer block, recorded in a conditioned pass."""
    x, t, text, ref = inputs
    unet = tiny_unet()
    install_adapters(unet, fusion=fusion)
    perturbed(unet)
    (name, proc), = [(n, p) for n, p in adapter_modules(unet).items() if n.startswith("mid_block.")]
    block = unet.get_submodule(name.split(".attn")[0])
    attn = getattr(block, proc.site)
    seen = {}
    block.register_forward_pre_hook(lambda m, a, k: seen.update(block_in=(a, k)), with_kwargs=True)
    block.register_forward_hook(lambda m, a, o: seen.update(block_out=o))
    attn.register_forward_pre_hook(lambda m, a, k: seen.update(attn_in=(a, k)), with_kwargs=True)
    attn.register_forward_hook(lambda m, a, o: seen.update(attn_out=o))
    feats = capture_features(unet, DEFAULT_LAYERS, ref, torch.tensor([1, 1]), torch.zeros_like(text))
    out(unet, x, t, text, feats)
    r = feats["mid_block.attentions.0"]
    (h, *_), kw = seen["attn_in"]
    with torch.no_grad():
        a = proc.base(attn, h, kw.get("encoder_hidden_states"))  # the frozen attention's own output
        if fusion == "textual_sum":  # IP-Adapter's decoupled cross-attention, as diffusers implements it
            from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

            C = attn.to_q.out_features
            ip = IPAdapterAttnProcessor2_0(C, C, num_tokens=(r.shape[1],), scale=1.0)
            ip.to_k_ip[0].weight.copy_(proc.to_k.weight)
            ip.to_v_ip[0].weight.copy_(proc.to_v.weight)
            want = ip(attn, h, encoder_hidden_states=(kw["encoder_hidden_states"], [r]))
            torch.testing.assert_close(seen["attn_out"], want, atol=1e-5, rtol=1e-4)
            return
        if fusion == "decoupled":  # the block itself is untouched; a residual block follows it
            torch.testing.assert_close(seen["attn_out"], a, atol=0, rtol=0)
            args, kwargs = seen["block_in"]
            y = block.forward(*args, **kwargs)  # the block without its hooks
            q = proc.norm(y) @ proc.to_q.weight.T
            want = y + manual_attention(q, r @ proc.to_k.weight.T, r @ proc.to_v.weight.T, proc.heads) @ proc.to_out.weight.T + proc.to_out.bias
            torch.testing.assert_close(seen["block_out"], want, atol=1e-5, rtol=1e-4)
            return
        (xb, *_), _ = seen["block_in"]
        q = proc.norm(xb) @ proc.to_q.weight.T  # the block's input, normalised by the adapter's own LayerNorm
        a_c = manual_attention(q, r @ proc.to_k.weight.T, r @ proc.to_v.weight.T, proc.heads) @ proc.to_out.weight.T + proc.to_out.bias
        want = (torch.cat([a, a_c], -1) @ proc.proj.weight.T + proc.proj.bias) if fusion == "concat" else a + a_c
    torch.testing.assert_close(seen["attn_out"], want, atol=1e-5, rtol=1e-4)


def attention_warnings(fn) -> list[str]:
    """What diffusers' Attention logs while ``fn`` runs (it drops, with a warning, every cross_attention_kwargs
    entry its processor's __call__ does not name)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers.models.attention_processor")
    logger.addHandler(handler)
    try:
        fn()
    finally:
        logger.removeHandler(handler)
    return [r for r in records if "are not expected" in r]


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_the_cache_reaches_the_adapters_and_no_attention_warns(inputs, fusion):
    """The cache travels in cross_attention_kwargs: every attention of the U-Net takes it without a word (the
    adapted ones and all the others), with and without gradient checkpointing; a U-Net without adapters would
    drop it with a warning at each of its attentions, which is what this test would see."""
    x, t, text, ref = inputs
    unet = tiny_unet()
    feats = capture_features(unet, DEFAULT_LAYERS, ref, torch.tensor([1, 1]), torch.zeros_like(text))
    dropped = attention_warnings(lambda: out(unet, x, t, text, feats))
    assert len(dropped) == len(unet.attn_processors)  # the stock processors: one warning per attention, per call
    install_adapters(unet, fusion=fusion)
    perturbed(unet)
    base = out(unet, x, t, text)
    assert attention_warnings(lambda: out(unet, x, t, text, feats, active=[True, False])) == []
    assert (out(unet, x, t, text, feats) - base).abs().max() > 1e-3  # and the adapters did read it
    unet.train()
    unet.enable_gradient_checkpointing()  # blocks called with positional arguments
    assert attention_warnings(lambda: call(unet, x, t, text, feats).sum().backward()) == []


def two_caches(inputs, fusion: str):
    """A tiny U-Net with "trained" adapters of ``fusion``, and two different caches of its references."""
    x, t, text, ref = inputs
    unet = tiny_unet()
    install_adapters(unet, fusion=fusion)
    perturbed(unet)
    a = capture_features(unet, DEFAULT_LAYERS, ref, torch.tensor([1, 1]), torch.zeros_like(text))
    return unet, a, {k: v.flip(0) for k, v in a.items()}


@pytest.mark.parametrize("fusion", ["concat", "decoupled"])
def test_a_call_inside_a_call_keeps_each_its_own_cache(inputs, fusion):
    """Nothing of a call is stored on the U-Net or its processors: a second call with another cache, made while
    the first is half-way through its U-Net (here from a hook on the mid block), changes neither result."""
    x, t, text, ref = inputs
    unet, a, b = two_caches(inputs, fusion)
    alone_a, alone_b = out(unet, x, t, text, a), out(unet, x, t, text, b, active=[False, True])
    nested = []

    def inner(module, args, output):
        if not nested:
            nested.append(None)  # once: the inner call passes through this hook too
            nested.append(out(unet, x, t, text, b, active=[False, True]))

    hook = unet.mid_block.register_forward_hook(inner)
    outer = out(unet, x, t, text, a)
    hook.remove()
    assert torch.equal(outer, alone_a) and torch.equal(nested[1], alone_b)
    assert (alone_a - alone_b).abs().max() > 1e-3  # the two caches do condition differently


def test_two_threads_share_one_unet_each_with_its_own_cache(inputs):
    """Two requests at once on one adapted U-Net (a server's threads): each gets what it gets alone."""
    import threading

    x, t, text, ref = inputs
    unet, a, b = two_caches(inputs, "concat")
    caches = {"a": (a, None), "b": (b, [False, True]), "none": (None, None)}
    alone = {name: out(unet, x, t, text, *cache) for name, cache in caches.items()}
    got: dict = {name: [] for name in caches}
    start = threading.Barrier(len(caches))

    def request(name):
        start.wait()
        for _ in range(4):
            got[name].append(out(unet, x, t, text, *caches[name]))

    threads = [threading.Thread(target=request, args=(name,)) for name in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(y, alone[name]) for name, ys in got.items() for y in ys) and all(len(ys) == 4 for ys in got.values())
    assert (alone["a"] - alone["b"]).abs().max() > 1e-3 and (alone["a"] - alone["none"]).abs().max() > 1e-3


@pytest.mark.parametrize("fusion", ["concat", "decoupled"])
@pytest.mark.parametrize("rows", [None, ([True, False], [False, True])], ids=["every-row", "some-rows"])
def test_the_adapted_unet_compiles_to_one_graph_that_another_cache_of_its_shape_reuses(inputs, fusion, rows):
    """torch.compile(fullgraph=True) of the adapted U-Net: no graph break (the cache is an argument, the block
    input reaches the adapter through the call's arguments), the eager result, and no recompilation for another
    cache of the same shapes, with every row conditioned or some (guidance: the rows are an index, data to the
    graph). Dynamo's guarantees, so the ``aot_eager`` backend: no C++ compiler, the eager kernels."""
    import torch._dynamo

    x, t, text, ref = inputs
    unet, a, b = two_caches(inputs, fusion)
    first_rows, second_rows = rows or (None, None)
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    try:
        with torch.no_grad():
            first = compiled(x, t, encoder_hidden_states=text, cross_attention_kwargs=cache_kwargs(a, first_rows)).sample
            with torch._dynamo.config.patch(error_on_recompile=True):
                second = compiled(x, t, encoder_hidden_states=text,
                                  cross_attention_kwargs=cache_kwargs(b, second_rows)).sample
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(first, out(unet, x, t, text, a, first_rows), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, out(unet, x, t, text, b, second_rows), atol=1e-5, rtol=1e-5)
    assert (first - second).abs().max() > 1e-3  # the second call did not replay the first's cache


@pytest.mark.parametrize("fusion", ["concat", "textual_sum"])
def test_the_wrapped_processors_own_arguments_still_reach_it(inputs, fusion):
    """A processor installed before the adapters (an IP-Adapter's, a custom one) keeps receiving the
    cross_attention_kwargs its own signature names, at adapted and passed-through attentions alike."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    seen = []

    class Marked(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     marker=None, ip_adapter_masks=None):
            seen.append((marker, ip_adapter_masks))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    x, t, text, ref = inputs
    unet = tiny_unet()
    unet.set_attn_processor(Marked())
    feats = capture_features(unet, DEFAULT_LAYERS, ref, torch.tensor([1, 1]), torch.zeros_like(text))
    install_adapters(unet, fusion=fusion)
    perturbed(unet)
    seen.clear()
    kwargs = {**cache_kwargs(feats, [True, False]), "marker": 7, "ip_adapter_masks": "m"}
    with torch.no_grad():
        warned = attention_warnings(lambda: unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs))
    assert warned == [] and seen == [(7, "m")] * len(unet.attn_processors)
    assert (out(unet, x, t, text, feats) - out(unet, x, t, text)).abs().max() > 1e-3  # the adapters still read it
    remove_adapters(unet)
    assert all(type(p) is Marked for p in unet.attn_processors.values())


def test_a_processor_that_names_more_arguments_pickles_with_its_wrapper(inputs):
    """The wrapper of a processor with arguments of its own (diffusers' IP-Adapter processor) is a class made for
    it: a pickled U-Net (torch.save, multiprocessing) still loads, and computes the same."""
    import pickle

    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    x, t, text, ref = inputs
    unet = tiny_unet()
    feats = capture_features(unet, DEFAULT_LAYERS, ref, torch.tensor([1, 1]), torch.zeros_like(text))
    name = next(n for n in unet.attn_processors if n.endswith("attn2.processor"))
    ip = IPAdapterAttnProcessor2_0(hidden_size=unet.get_submodule(name[:-len(".processor")]).to_q.out_features,
                                   cross_attention_dim=32, num_tokens=(1,), scale=0.0)
    unet.set_attn_processor({**unet.attn_processors, name: ip})
    install_adapters(unet)
    perturbed(unet)
    copy = pickle.loads(pickle.dumps(unet))
    wrapper = copy.attn_processors[name]
    assert type(wrapper).__name__ == "PassThrough" and isinstance(wrapper.base, IPAdapterAttnProcessor2_0)
    torch.testing.assert_close(out(copy, x, t, text, feats), out(unet, x, t, text, feats), rtol=0, atol=0)
