"""DreamCache conditioning adapters and the reference feature cache (paper sec. 3.1-3.2).

Feature cache: the reference latent, noised to t=1, goes once through the frozen U-Net with the empty
prompt; the *input* hidden states of each selected transformer (``Transformer2DModel``) are recorded as
``{layer: (B, H*W, C)}``. At 512 px on SD 1.5 that is 3.03M values per image.

Adapter: installed as the attention processor of the self-attention (``attn1``) of every transformer block
in a selected layer. With ``a`` the block's own self-attention output and ``x`` the block's input (the
residual stream, before the block's ``norm1``):

    q = W_Q LN(x),  k = W_K h_ref,  v = W_V h_ref,  a_c = W_O softmax(q k^T / sqrt(d)) v   (same heads as the layer)
    out = W_proj([a; a_c])   in place of a, before the residual add

``LN`` is the adapter's own LayerNorm (the official code's ``norm2_mem``). 6 C^2 + 4 C parameters per block
(25,207,040 on SD 1.5). ``W_proj`` starts as [I, 0], so the untrained adapter is the identity (the official
code initialises it at random; identity keeps the base model exact at step 0); rows without a reference skip
the adapter and compute exactly the original layer.
Everything is injected with ``unet.set_attn_processor``; ``remove_adapters`` restores the original
processors, and with them the base model bit for bit.

That is the paper's fusion, ``concat``. The other rows of its Table 4 are ``install_adapters(fusion=...)``:
``spatial_sum`` (a + a_c), ``textual_sum`` (IP-Adapter's decoupled cross-attention on attn2) and
``decoupled`` (a separate residual cross-attention block after each transformer block, after ViCo). Each
starts as the identity; the file's metadata names the fusion, and loading installs the same one.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dreamcache.bases import SD_LAYERS
from dreamcache.conditioning import Condition, as_condition

DEFAULT_LAYERS = SD_LAYERS  # SD 1.x/2.x's (the official code's); other bases pass their spec's layers
PREFIX = "dreamcache."  # every trainable and saved tensor's name starts with the processor path
FORMAT = "dreamcache-adapters/2"  # /1: no query LayerNorm


@dataclass
class CacheSlot:
    """What the adapters read during a U-Net pass: per-layer reference features and which rows use them.

    Which rows are active is read to the host once, when the features are set (``cached``), so a U-Net pass
    makes no host-device synchronisation of its own: a GPU keeps its queue of kernels full."""

    features: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (B, M, C)
    active: torch.Tensor | None = None  # (B,) bool when only some rows use the features; None = every row
    rows: torch.Tensor | None = None  # the indices of those rows, on the features' device
    none_active: bool = False  # True when no row uses the features (the adapters are skipped)

    def set(self, features: dict[str, torch.Tensor], active: torch.Tensor | None = None) -> None:
        self.clear()
        self.features = features
        if active is None:
            return
        flags = active.detach().to("cpu", torch.bool)  # the one synchronisation per context
        if not bool(flags.any()):
            self.none_active = True
        elif not bool(flags.all()):
            self.active, self.rows = active.to(torch.bool), flags.nonzero().squeeze(1).to(active.device)

    def clear(self) -> None:
        self.features, self.active, self.rows, self.none_active = {}, None, None, False


class Adapter(nn.Module):
    """One transformer block's DreamCache adapter: installed as the processor of one of the block's attentions
    (``site``), it wraps the original processor (``base``) and holds only new weights. Subclasses are the
    fusions (how the reference attention enters the block, paper Table 4); this class routes the rows."""

    site = "attn1"  # the attention whose processor the adapter replaces
    needs_block_input = False  # the query reads the block's input (captured by a forward pre-hook)
    skip_inactive_rows = True  # False: every row goes through the adapter and is masked after (benchmarks only)

    def __init__(self, layer: str, dim: int, heads: int, slot: CacheSlot, base):
        super().__init__()
        self.layer, self.heads, self.slot, self.base = layer, heads, slot, base
        self.block_input: torch.Tensor | None = None

    def capture_block_input(self, block, args, kwargs) -> None:
        """Forward pre-hook of the transformer block: its input is the query's source. (Gradient checkpointing
        runs the block again during backward, and this hook with it.)"""
        self.block_input = args[0] if args else kwargs["hidden_states"]

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        a = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)  # (B, N, C)
        x, self.block_input = self.block_input, None
        if self.needs_block_input:
            if self.slot.features.get(self.layer) is not None and (x is None or x.shape != hidden_states.shape):
                raise RuntimeError(f"{self.layer}: the adapter did not see its transformer block's input")
            hidden_states = x
        return self.route(a, hidden_states, attn)

    def route(self, a: torch.Tensor, x: torch.Tensor, attn=None) -> torch.Tensor:
        """``fuse`` on the rows that use the reference; the other rows keep ``a`` exactly."""
        ref = self.slot.features.get(self.layer)
        if ref is None:
            return a
        if self.slot.none_active:  # no row uses the reference (dropout took them all)
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                # DDP expects every trainable parameter in the graph: zero gradients, not none
                return a + 0.0 * sum(p.sum() for p in self.parameters()).to(a.dtype)
            return a
        rows = self.slot.rows
        if rows is None:
            return self.fuse(a, x, ref.to(a.dtype), attn)
        if not self.skip_inactive_rows:
            return torch.where(self.slot.active.view(-1, 1, 1), self.fuse(a, x, ref.to(a.dtype), attn), a)
        # Rows without a reference (dropout, the unconditional rows of guidance) keep the original layer's
        # output and cost nothing: only the active rows go through the adapter.
        return a.index_put((rows,), self.fuse(a[rows], x[rows], ref[rows].to(a.dtype), attn))

    def fuse(self, a: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, attn) -> torch.Tensor:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of (B, N, C) queries over (B, M, C) keys and values, with the layer's heads."""
        B, N, C = q.shape
        h = self.heads
        q, k, v = (z.view(B, -1, h, C // h).transpose(1, 2) for z in (q, k, v))  # (B, h, *, d)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)


class ReferenceAttention(Adapter):
    """W_O attention(W_Q LN(x), W_K ref, W_V ref) with its own query LayerNorm: the spatial fusions' part."""

    needs_block_input = True

    def __init__(self, layer: str, dim: int, heads: int, slot: CacheSlot, base):
        super().__init__(layer, dim, heads, slot, base)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)  # the query's own normalisation of the block input

    def reference_attention(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.attend(self.to_q(self.norm(x)), self.to_k(ref), self.to_v(ref)))


class ConcatFusion(ReferenceAttention):
    """The paper's "spatial concat": W_proj([a; a_c]) in place of the self-attention output ``a``.
    6 C^2 + 4 C parameters per block; W_proj = [I, 0] at init."""

    def __init__(self, layer: str, dim: int, heads: int, slot: CacheSlot, base):
        super().__init__(layer, dim, heads, slot, base)
        self.proj = nn.Linear(2 * dim, dim)
        with torch.no_grad():  # W_proj = [I, 0]: the untrained adapter passes a through unchanged
            self.proj.weight.zero_()
            self.proj.weight[:, :dim].copy_(torch.eye(dim))
            self.proj.bias.zero_()

    def fuse(self, a, x, ref, attn):
        return self.proj(torch.cat([a, self.reference_attention(x, ref)], dim=-1))


class SpatialSumFusion(ReferenceAttention):
    """Table 4's "spatial sum": a + a_c. 4 C^2 + 3 C per block; W_O starts at zero (the identity)."""

    def __init__(self, layer: str, dim: int, heads: int, slot: CacheSlot, base):
        super().__init__(layer, dim, heads, slot, base)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def fuse(self, a, x, ref, attn):
        return a + self.reference_attention(x, ref)


class TextualSumFusion(Adapter):
    """Table 4's "textual sum" (IP-Adapter's decoupled cross-attention): on the text cross-attention (attn2),
    whose frozen query also attends over W_K ref, W_V ref; the two attention outputs are summed before the
    layer's frozen W_O. 2 C^2 per block; W_V starts at zero (the identity)."""

    site = "attn2"

    def __init__(self, layer: str, dim: int, heads: int, slot: CacheSlot, base):
        super().__init__(layer, dim, heads, slot, base)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.to_v.weight)

    def fuse(self, a, x, ref, attn):
        # W_O (h_text + h_ref) + b = a + W_O h_ref, with a the layer's own output
        h = self.attend(attn.to_q(x), self.to_k(ref), self.to_v(ref))
        return a + F.linear(h, attn.to_out[0].weight) / attn.rescale_output_factor


class DecoupledFusion(ReferenceAttention):
    """Table 4's "decoupled blocks" (after ViCo): an independent residual cross-attention block interleaved
    after the transformer block, y + W_O attention(W_Q LN(y), W_K ref, W_V ref) on its output y. Its weights
    live on the block's attn1 processor, which otherwise passes through. 4 C^2 + 3 C per block; W_O starts
    at zero (the identity)."""

    needs_block_input = False

    def __init__(self, layer: str, dim: int, heads: int, slot: CacheSlot, base):
        super().__init__(layer, dim, heads, slot, base)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def after_block(self, block, args, kwargs, output):
        """Forward hook of the transformer block: the interleaved block on its output."""
        return self.route(output, output)

    def fuse(self, a, x, ref, attn):
        return a + self.reference_attention(x, ref)


FUSIONS: dict[str, type[Adapter]] = {"concat": ConcatFusion, "spatial_sum": SpatialSumFusion,
                                     "textual_sum": TextualSumFusion, "decoupled": DecoupledFusion}
DEFAULT_FUSION = "concat"  # the paper's


def _blocks(unet, layer: str) -> list[tuple[str, nn.Module]]:
    """(block path, transformer block) of every transformer block in ``layer``."""
    module = unet.get_submodule(layer)
    return [(f"{layer}.transformer_blocks.{i}", block) for i, block in enumerate(module.transformer_blocks)]


def install_adapters(unet, layers: tuple[str, ...] = DEFAULT_LAYERS, fusion: str = DEFAULT_FUSION) -> CacheSlot:
    """Puts a DreamCache adapter of kind ``fusion`` on every transformer block of ``layers`` (on the
    attention's device and in its dtype); returns the slot they read."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}: one of {', '.join(FUSIONS)}")
    kind = FUSIONS[fusion]
    slot = CacheSlot()
    processors = dict(unet.attn_processors)
    hooks = []
    for layer in layers:
        for path, block in _blocks(unet, layer):
            name = f"{path}.{kind.site}.processor"
            attn = getattr(block, kind.site)
            weight = attn.to_q.weight
            proc = kind(layer, attn.to_q.out_features, attn.heads, slot, processors[name]).to(
                device=weight.device, dtype=weight.dtype)
            if proc.needs_block_input:
                hooks.append(block.register_forward_pre_hook(proc.capture_block_input, with_kwargs=True))
            if isinstance(proc, DecoupledFusion):
                hooks.append(block.register_forward_hook(proc.after_block, with_kwargs=True))
            processors[name] = proc
    unet.set_attn_processor(processors)
    unet.dreamcache_slot, unet.dreamcache_layers, unet.dreamcache_hooks = slot, tuple(layers), hooks
    unet.dreamcache_fusion = fusion
    return slot


def remove_adapters(unet) -> None:
    """Restores each block's original processor (the one the adapter wrapped)."""
    processors = {k: (p.base if isinstance(p, Adapter) else p) for k, p in unet.attn_processors.items()}
    unet.set_attn_processor(processors)
    for hook in getattr(unet, "dreamcache_hooks", ()):
        hook.remove()
    for attr in ("dreamcache_slot", "dreamcache_layers", "dreamcache_hooks", "dreamcache_fusion"):
        if hasattr(unet, attr):
            delattr(unet, attr)


def adapter_modules(unet) -> dict[str, Adapter]:
    return {k: p for k, p in unet.attn_processors.items() if isinstance(p, Adapter)}


def adapter_state_dict(unet) -> dict[str, torch.Tensor]:
    """The one definition of what trains and what is saved: the adapters' own weights, nothing else."""
    return {f"{PREFIX}{name}.{pname}": p for name, proc in adapter_modules(unet).items()
            for pname, p in proc.named_parameters()}


def trainable_parameters(unet) -> list[nn.Parameter]:
    """Freezes everything in ``unet`` but the adapters and returns the adapters' parameters."""
    unet.requires_grad_(False)
    params = list(adapter_state_dict(unet).values())
    for p in params:
        p.requires_grad_(True)
    return params


def load_adapter_state(unet, tensors: dict[str, torch.Tensor]) -> None:
    own = adapter_state_dict(unet)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter weights do not match the installed adapters: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (were they trained with other layers or another base?)")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k].to(p.dtype))


def save_adapters(unet, path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in adapter_state_dict(unet).items()}
    meta = {"format": FORMAT, "fusion": unet.dreamcache_fusion, "layers": json.dumps(list(unet.dreamcache_layers)),
            "dims": json.dumps({layer: unet.get_submodule(layer).transformer_blocks[0].attn1.to_q.out_features
                                for layer in unet.dreamcache_layers}), **metadata}
    save_file(tensors, path, metadata=meta)


@contextlib.contextmanager
def cached(unet, features: dict[str, torch.Tensor], active: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, the adapters condition on ``features`` (rows where ``active``)."""
    slot: CacheSlot = unet.dreamcache_slot
    slot.set(features, active)
    try:
        yield
    finally:
        slot.clear()


@torch.no_grad()
def capture_features(unet, layers: tuple[str, ...], latents: torch.Tensor, timesteps: torch.Tensor,
                     condition: Condition | torch.Tensor) -> dict[str, torch.Tensor]:
    """One U-Net pass recording the input hidden states of ``layers``: {layer: (B, H*W, C)}.

    The caller passes the reference latent already noised to its timestep (t=1) and the empty prompt's
    condition (a ``Condition``, or SD 1.x/2.x's text embeddings alone). Adapters, if installed, are inactive during the pass (no features in the slot). The pass stops
    at the last selected layer's input: on SD 1.5's default layers that skips most of the last up block.
    """
    found: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        def hook(module, args, kwargs, layer=layer):
            x = args[0] if args else kwargs["hidden_states"]  # (B, C, H, W)
            found[layer] = x.flatten(2).transpose(1, 2).contiguous()  # (B, H*W, C)
            if len(found) == len(layers):
                raise _Captured  # the rest of the U-Net would compute nothing the cache needs
        hooks.append(unet.get_submodule(layer).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        unet(latents, timesteps, **as_condition(condition).kwargs())
    except _Captured:
        pass
    finally:
        for h in hooks:
            h.remove()
    return found


class _Captured(Exception):
    """Ends a caching pass once the input of the last selected layer is recorded."""


REFERENCE_TIMESTEP = 1  # paper sec. 3.1: the reference is encoded at t=1 (Table S3)
CACHE_PROMPT = ""  # paper sec. 3.1: the caching pass uses the empty prompt (Table 6 adds text)
CACHE_PROMPT_FIELDS = ("subject", "caption")


def check_cache_prompt(template: str) -> str:
    """``template`` if it is a valid caching prompt: text whose only fields are {subject} and {caption}."""
    import string

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"--cache-prompt {template!r} is not a valid template ({e}); write literal braces as {{{{ }}}}") from None
    unknown = fields - set(CACHE_PROMPT_FIELDS)
    if unknown:
        raise ValueError(f"--cache-prompt {template!r} has unknown field(s) {', '.join(sorted(unknown))}: "
                         "it may use {subject} (the subject phrase) and {caption} (the sample's caption)")
    return template


def cache_prompt(template: str, subject: str | None = None, caption: str | None = None) -> str:
    """The caching pass's text: ``template`` with {subject} and {caption} filled in (ValueError naming what a
    field needs when its value is missing)."""
    values = {"subject": subject, "caption": caption}
    missing = [k for k in CACHE_PROMPT_FIELDS if "{" + k + "}" in template and values[k] is None]
    if missing:
        raise ValueError(f"the adapters were trained caching the reference with the prompt {template!r}: give "
                         f"the reference's {' and '.join(missing)} (subject=/caption=, or personalize --subject)")
    return check_cache_prompt(template).format(**values)


@torch.no_grad()
def reference_features(unet, layers: tuple[str, ...], scheduler, latents: torch.Tensor, noise: torch.Tensor,
                       condition: Condition | torch.Tensor, timestep: int = REFERENCE_TIMESTEP) -> dict[str, torch.Tensor]:
    """The feature cache of reference latents (B, 4, h, w): noised to ``timestep`` (the paper's t=1; other
    values for the Table S3 ablation) with ``noise``, one frozen pass with the caching prompt's ``condition``
    (1 or B rows): the empty prompt's unless the adapters were trained with another (Table 6). The one
    definition for training and inference."""
    B = latents.shape[0]
    t = torch.full((B,), timestep, dtype=torch.long, device=latents.device)
    noisy = scheduler.add_noise(latents, noise.to(latents), t)
    condition = as_condition(condition)
    return capture_features(unet, layers, noisy, t, condition.expand(B) if len(condition) == 1 else condition)
