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

The cache comes with each U-Net call, as diffusers passes IP-Adapter inputs:
``unet(x, t, encoder_hidden_states=..., cross_attention_kwargs=cache_kwargs(features, active))``. The
processors hold only their weights and the processor they wrap; a transformer block's input (the query's
source) is added to that block's ``cross_attention_kwargs`` by a forward pre-hook that returns the call's
arguments, so one U-Net serves any number of calls, each with its own cache or none. Every wrapper names the
wrapped processor's own arguments too (``forwarding``), so they still reach it.

That is the paper's fusion, ``concat``. The other rows of its Table 4 are ``install_adapters(fusion=...)``:
``spatial_sum`` (a + a_c), ``textual_sum`` (IP-Adapter's decoupled cross-attention on attn2) and
``decoupled`` (a separate residual cross-attention block after each transformer block, after ViCo). Each
starts as the identity; the file's metadata names the fusion, and loading installs the same one.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dreamcache.bases import SD_LAYERS, BaseIdentity
from dreamcache.conditioning import Condition, as_condition

DEFAULT_LAYERS = SD_LAYERS  # SD 1.x/2.x's (the official code's); other bases pass their spec's layers
PREFIX = "dreamcache."  # every trainable and saved tensor's name starts with the processor path
FORMAT = "dreamcache-adapters/2"  # /1: no query LayerNorm
CACHE_KEY = "dreamcache"  # the cross_attention_kwargs entry that carries a call's cache


@dataclass(frozen=True)
class CacheInputs:
    """What the adapters read in one U-Net call, under ``cross_attention_kwargs["dreamcache"]``: per-layer
    reference features and which rows use them. ``rows`` is built on the host with the inputs
    (``cache_kwargs``), so a U-Net pass makes no host-device synchronisation of its own."""

    features: Mapping[str, torch.Tensor]  # layer -> (B, M, C), or (1, M, C) shared by every row
    # The rows that use the features: (n,) indices on their device, or a slice (a contiguous block, as guidance's
    # rows are: no gather or scatter); None: every row
    rows: torch.Tensor | slice | None = None
    block_input: torch.Tensor | None = None  # (B, N, C): the transformer block's input, added by its pre-hook
    # Called by each adapter as attention(layer, rows, probs): probs (n, N, M), the attention of the n conditioned
    # rows' N image tokens over the M reference tokens, averaged over heads (each row of it sums to 1). Off
    # (None) the adapters use fused attention and compute no probabilities (dreamcache/attention.py records them).
    attention: Callable[[str, torch.Tensor | None, torch.Tensor], None] | None = None
    # (B, 1, 1) bools, on the features' device: every row is fused and the rows without the reference keep the
    # block's own output (torch.where). Instead of ``rows``: the same result at fixed shapes whatever the rows,
    # for a compiled training step; the dropped rows' adapter FLOPs are spent.
    mask: torch.Tensor | None = None


def host_to_device(x: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on ``device`` without a synchronisation: to a GPU through pinned memory, copied
    asynchronously (a pageable copy makes PyTorch wait for the stream); elsewhere a plain ``to``."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return (x if x.is_pinned() else x.pin_memory()).to(device, dtype, non_blocking=True)
    return x.to(device, dtype)


def cache_kwargs(features: Mapping[str, torch.Tensor], active: torch.Tensor | Sequence[bool] | None = None,
                 static: bool = False) -> dict[str, CacheInputs]:
    """The U-Net's ``cross_attention_kwargs`` that condition the adapters on ``features`` in the rows where
    ``active`` ((B,) bools; None: every row). ``active`` is read on the host: give a list or a CPU tensor (a
    device tensor costs one synchronisation, here, not one per adapter). ``static``: the rows as a mask, so
    that shapes do not depend on which rows are active (``CacheInputs.mask``; torch.compile without recompiles)."""
    rows = mask = None
    if active is not None:
        flags = torch.as_tensor(active, dtype=torch.bool).cpu()
        device = next(iter(features.values())).device if features else "cpu"
        if static:
            mask = host_to_device(flags.view(-1, 1, 1), device)
        elif not bool(flags.all()):  # an empty index when no row uses them: the adapters are skipped
            rows = host_to_device(flags.nonzero().squeeze(1), device)
    return {CACHE_KEY: CacheInputs(features, rows, mask=mask)}


class Adapter(nn.Module):
    """One transformer block's DreamCache adapter: installed as the processor of one of the block's attentions
    (``site``), it wraps the original processor (``base``) and holds only new weights. Subclasses are the
    fusions (how the reference attention enters the block, paper Table 4); this class routes the rows."""

    site = "attn1"  # the attention whose processor the adapter replaces
    needs_block_input = False  # the query reads the block's input (added to the call by the block's pre-hook)

    def __init__(self, layer: str, dim: int, heads: int, base):
        super().__init__()
        self.layer, self.heads, self.base = layer, heads, base

    # The arguments are named, as diffusers' own processors name theirs: Attention.forward passes a processor
    # only the cross_attention_kwargs its __call__ declares (and logs a warning for every other).
    # A wrapped processor's own named arguments are declared too, by ``forwarding`` (an IP-Adapter's masks).
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 dreamcache: CacheInputs | None = None, **kwargs) -> torch.Tensor:
        a = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)  # (B, N, C)
        x = hidden_states
        if self.needs_block_input and dreamcache is not None and self.layer in dreamcache.features:
            x = dreamcache.block_input
            if x is None or x.shape != hidden_states.shape:
                raise RuntimeError(f"{self.layer}: the adapter did not receive its transformer block's input "
                                   "(were the adapters installed with install_adapters?)")
        return self.route(a, x, dreamcache, attn)

    def route(self, a: torch.Tensor, x: torch.Tensor, cache: CacheInputs | None, attn=None) -> torch.Tensor:
        """``fuse`` on the rows that use the reference; the other rows keep ``a`` exactly and cost nothing."""
        ref = cache.features.get(self.layer) if cache is not None else None
        if ref is None:
            return a
        rows = cache.rows
        record = partial(cache.attention, self.layer, rows) if cache.attention is not None else None
        if cache.mask is not None:
            return torch.where(cache.mask, self.fuse(a, x, ref.to(a.dtype).expand(len(a), -1, -1), attn), a)
        if rows is None:
            return self.fuse(a, x, ref.to(a.dtype).expand(len(a), -1, -1), attn, record)
        if isinstance(rows, slice):  # views of a block of rows, the others put back around the fused ones
            start, stop, _ = rows.indices(len(a))
            ref = ref.to(a.dtype).expand(stop - start, -1, -1) if len(ref) == 1 else ref[rows].to(a.dtype)
            return torch.cat([a[:start], self.fuse(a[rows], x[rows], ref, attn, record), a[stop:]])
        if len(rows) == 0:  # no row uses the reference (dropout took them all)
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                # DDP expects every trainable parameter in the graph: zero gradients, not none
                return a + 0.0 * sum(p.sum() for p in self.parameters()).to(a.dtype)
            return a
        ref = ref.to(a.dtype)
        ref = ref.expand(len(rows), -1, -1) if len(ref) == 1 else ref[rows]  # one reference shared, or one per row
        return a.index_put((rows,), self.fuse(a[rows], x[rows], ref, attn, record))

    def fuse(self, a: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, attn, record=None) -> torch.Tensor:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, record=None) -> torch.Tensor:
        """Multi-head attention of (B, N, C) queries over (B, M, C) keys and values, with the layer's heads.
        With ``record``, the probabilities are computed (not fused) and handed to it, averaged over heads."""
        B, N, C = q.shape
        h = self.heads
        q, k, v = (z.view(B, -1, h, C // h).transpose(1, 2) for z in (q, k, v))  # (B, h, *, d)
        if record is None:
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * (C // h) ** -0.5, dim=-1)  # (B, h, N, M)
        record(probs.mean(1))
        return (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, C)


class PassThrough:
    """The processor of every other attention while adapters are installed: the original one, with a signature
    that takes the call's cache, so no attention drops it with a warning on every call."""

    def __init__(self, base):
        self.base = base

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 dreamcache: CacheInputs | None = None, **kwargs) -> torch.Tensor:
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


class ReferenceAttention(Adapter):
    """W_O attention(W_Q LN(x), W_K ref, W_V ref) with its own query LayerNorm: the spatial fusions' part."""

    needs_block_input = True

    def __init__(self, layer: str, dim: int, heads: int, base):
        super().__init__(layer, dim, heads, base)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)  # the query's own normalisation of the block input

    def reference_attention(self, x: torch.Tensor, ref: torch.Tensor, record=None) -> torch.Tensor:
        return self.to_out(self.attend(self.to_q(self.norm(x)), self.to_k(ref), self.to_v(ref), record))


class ConcatFusion(ReferenceAttention):
    """The paper's "spatial concat": W_proj([a; a_c]) in place of the self-attention output ``a``.
    6 C^2 + 4 C parameters per block; W_proj = [I, 0] at init."""

    def __init__(self, layer: str, dim: int, heads: int, base):
        super().__init__(layer, dim, heads, base)
        self.proj = nn.Linear(2 * dim, dim)
        with torch.no_grad():  # W_proj = [I, 0]: the untrained adapter passes a through unchanged
            self.proj.weight.zero_()
            self.proj.weight[:, :dim].copy_(torch.eye(dim))
            self.proj.bias.zero_()

    def fuse(self, a, x, ref, attn, record=None):
        return self.proj(torch.cat([a, self.reference_attention(x, ref, record)], dim=-1))


class SpatialSumFusion(ReferenceAttention):
    """Table 4's "spatial sum": a + a_c. 4 C^2 + 3 C per block; W_O starts at zero (the identity)."""

    def __init__(self, layer: str, dim: int, heads: int, base):
        super().__init__(layer, dim, heads, base)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def fuse(self, a, x, ref, attn, record=None):
        return a + self.reference_attention(x, ref, record)


class TextualSumFusion(Adapter):
    """Table 4's "textual sum" (IP-Adapter's decoupled cross-attention): on the text cross-attention (attn2),
    whose frozen query also attends over W_K ref, W_V ref; the two attention outputs are summed before the
    layer's frozen W_O. 2 C^2 per block; W_V starts at zero (the identity)."""

    site = "attn2"

    def __init__(self, layer: str, dim: int, heads: int, base):
        super().__init__(layer, dim, heads, base)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.to_v.weight)

    def fuse(self, a, x, ref, attn, record=None):
        # W_O (h_text + h_ref) + b = a + W_O h_ref, with a the layer's own output
        h = self.attend(attn.to_q(x), self.to_k(ref), self.to_v(ref), record)
        return a + F.linear(h, attn.to_out[0].weight) / attn.rescale_output_factor


class DecoupledFusion(ReferenceAttention):
    """Table 4's "decoupled blocks" (after ViCo): an independent residual cross-attention block interleaved
    after the transformer block, y + W_O attention(W_Q LN(y), W_K ref, W_V ref) on its output y. Its weights
    live on the block's attn1 processor, which otherwise passes through. 4 C^2 + 3 C per block; W_O starts
    at zero (the identity)."""

    needs_block_input = False

    def __init__(self, layer: str, dim: int, heads: int, base):
        super().__init__(layer, dim, heads, base)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 dreamcache: CacheInputs | None = None, **kwargs) -> torch.Tensor:
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def after_block(self, position: int, block, args, kwargs, output):
        """Forward hook of the transformer block: the interleaved block on its output, with the call's cache."""
        return self.route(output, output, _call_cache(args, kwargs, position))

    def fuse(self, a, x, ref, attn, record=None):
        return a + self.reference_attention(x, ref, record)


FUSIONS: dict[str, type[Adapter]] = {"concat": ConcatFusion, "spatial_sum": SpatialSumFusion,
                                     "textual_sum": TextualSumFusion, "decoupled": DecoupledFusion}
DEFAULT_FUSION = "concat"  # the paper's


_NAMED = ("attn", "hidden_states", "encoder_hidden_states", "attention_mask", "temb", CACHE_KEY)


def forwarding(cls: type, base) -> type:
    """``cls`` (``PassThrough`` or an adapter) declaring, besides its own arguments, every other named argument of
    the processor ``base`` it wraps. diffusers' ``Attention`` hands a processor only the ``cross_attention_kwargs``
    its ``__call__`` names, so a wrapper that named fewer would drop the wrapped one's (an IP-Adapter's
    ``ip_adapter_masks``, a custom processor's own) without a word."""
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    extra = tuple(p.name for p in inspect.signature(base.__call__).parameters.values()
                  if p.kind in keyword and p.name not in _NAMED)
    return _declaring(cls, extra) if extra else cls


_DECLARING: dict[tuple[type, tuple[str, ...]], type] = {}


def _declaring(cls: type, extra: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose ``__call__`` signature also names ``extra`` (one class per pair, reused)."""
    if (cls, extra) not in _DECLARING:
        def __call__(self, *args, **kwargs):
            return cls.__call__(self, *args, **kwargs)

        def __reduce_ex__(self, protocol):  # pickled as (cls, extra) and its state: the class is made on loading
            return _declared, (cls, extra, self.__getstate__())

        own = [p for p in inspect.signature(cls.__call__).parameters.values() if p.kind is not p.VAR_KEYWORD]
        named = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in extra]
        __call__.__signature__ = inspect.Signature([*own, *named])
        _DECLARING[cls, extra] = type(cls.__name__, (cls,), {"__call__": __call__, "__reduce_ex__": __reduce_ex__,
                                                            "__module__": cls.__module__,
                                                            "__qualname__": cls.__qualname__})
    return _DECLARING[cls, extra]


def _declared(cls: type, extra: tuple[str, ...], state: dict):
    """Unpickles an instance of ``_declaring(cls, extra)``."""
    obj = object.__new__(_declaring(cls, extra))
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)
    return obj


def _blocks(unet, layer: str) -> list[tuple[str, nn.Module]]:
    """(block path, transformer block) of every transformer block in ``layer``."""
    module = unet.get_submodule(layer)
    return [(f"{layer}.transformer_blocks.{i}", block) for i, block in enumerate(module.transformer_blocks)]


def _kwargs_position(block) -> int:
    """Where ``cross_attention_kwargs`` sits among the block's positional arguments: gradient checkpointing
    calls the block with every argument positional (BasicTransformerBlock: the sixth)."""
    return list(inspect.signature(block.forward).parameters).index("cross_attention_kwargs")


def _call_cache(args: tuple, kwargs: dict, position: int) -> CacheInputs | None:
    """The cache of a block call, however its ``cross_attention_kwargs`` were passed."""
    found = args[position] if len(args) > position else kwargs.get("cross_attention_kwargs")
    return (found or {}).get(CACHE_KEY)


def _add_block_input(position: int, block, args: tuple, kwargs: dict):
    """Forward pre-hook of an adapted transformer block: the call's arguments, with the block's input (the
    adapter's query source) added to the cache in its ``cross_attention_kwargs``. Nothing is stored: gradient
    checkpointing re-runs the block, and this hook, with the same arguments during backward."""
    cache = _call_cache(args, kwargs, position)
    if cache is None:
        return None
    x = args[0] if args else kwargs["hidden_states"]  # (B, N, C)
    if len(args) > position:
        mine = {**args[position], CACHE_KEY: replace(cache, block_input=x)}
        return (*args[:position], mine, *args[position + 1:]), kwargs
    mine = {**kwargs["cross_attention_kwargs"], CACHE_KEY: replace(cache, block_input=x)}
    return args, {**kwargs, "cross_attention_kwargs": mine}


def install_adapters(unet, layers: tuple[str, ...] = DEFAULT_LAYERS, fusion: str = DEFAULT_FUSION) -> dict[str, Adapter]:
    """Puts a DreamCache adapter of kind ``fusion`` on every transformer block of ``layers`` (on the
    attention's device and in its dtype), and a ``PassThrough`` on every other attention; returns the adapters
    by processor name."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}: one of {', '.join(FUSIONS)}")
    if getattr(unet, "dreamcache_layers", None) is not None:
        raise RuntimeError("the U-Net already has DreamCache adapters: remove_adapters(unet) first")
    kind = FUSIONS[fusion]
    processors = {name: forwarding(PassThrough, p)(p) for name, p in unet.attn_processors.items()}
    hooks = []
    for layer in layers:
        for path, block in _blocks(unet, layer):
            name = f"{path}.{kind.site}.processor"
            attn = getattr(block, kind.site)
            weight = attn.to_q.weight
            base = processors[name].base
            proc = forwarding(kind, base)(layer, attn.to_q.out_features, attn.heads, base).to(
                device=weight.device, dtype=weight.dtype)
            position = _kwargs_position(block)
            if proc.needs_block_input:
                hooks.append(block.register_forward_pre_hook(partial(_add_block_input, position), with_kwargs=True))
            if isinstance(proc, DecoupledFusion):
                hooks.append(block.register_forward_hook(partial(proc.after_block, position), with_kwargs=True))
            processors[name] = proc
    unet.set_attn_processor(processors)
    unet.dreamcache_layers, unet.dreamcache_hooks, unet.dreamcache_fusion = tuple(layers), hooks, fusion
    return adapter_modules(unet)


def remove_adapters(unet) -> None:
    """Restores every attention's original processor (the one the adapter or pass-through wrapped)."""
    processors = {k: (p.base if isinstance(p, (Adapter, PassThrough)) else p) for k, p in unet.attn_processors.items()}
    unet.set_attn_processor(processors)
    for hook in getattr(unet, "dreamcache_hooks", ()):
        hook.remove()
    for attr in ("dreamcache_layers", "dreamcache_hooks", "dreamcache_fusion"):
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
    """The adapters' weights, with what loading needs: fusion, layers, widths, and the identity of the base they
    belong to (``BaseIdentity``: from the U-Net's config and ``metadata["base"]``, the checkpoint, where given)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in adapter_state_dict(unet).items()}
    meta = {"format": FORMAT, "fusion": unet.dreamcache_fusion, "layers": json.dumps(list(unet.dreamcache_layers)),
            "dims": json.dumps({layer: unet.get_submodule(layer).transformer_blocks[0].attn1.to_q.out_features
                                for layer in unet.dreamcache_layers}), **metadata,
            **BaseIdentity.of(unet.config, metadata.get("base")).metadata()}
    save_file(tensors, path, metadata=meta)


@torch.no_grad()
def capture_features(unet, layers: tuple[str, ...], latents: torch.Tensor, timesteps: torch.Tensor,
                     condition: Condition | torch.Tensor) -> dict[str, torch.Tensor]:
    """One U-Net pass recording the input hidden states of ``layers``: {layer: (B, H*W, C)}.

    The caller passes the reference latent already noised to its timestep (t=1) and the empty prompt's
    condition (a ``Condition``, or SD 1.x/2.x's text embeddings alone). Adapters, if installed, are inactive
    (the call carries no cache). The layers' pre-hooks live for this pass only, and the pass stops at the last
    selected layer's input: on SD 1.5's default layers that skips most of the last up block.
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


def forward_process(scheduler):
    """DDPM's forward process on ``scheduler``'s beta schedule: what the trainer noises with (its
    DDPMScheduler), built from the config of any scheduler of the checkpoint. A sampler's own ``add_noise`` is
    another thing: Euler's is x0 + sigma n, unscaled, and a trailing-spaced one indexes the timesteps of its
    last ``set_timesteps``."""
    from diffusers import DDPMScheduler

    return scheduler if type(scheduler) is DDPMScheduler else DDPMScheduler.from_config(scheduler.config)


@torch.no_grad()
def reference_features(unet, layers: tuple[str, ...], scheduler, latents: torch.Tensor, noise: torch.Tensor,
                       condition: Condition | torch.Tensor, timestep: int = REFERENCE_TIMESTEP) -> dict[str, torch.Tensor]:
    """The feature cache of reference latents (B, 4, h, w): noised to ``timestep`` (the paper's t=1; other
    values for the Table S3 ablation) with ``noise`` by DDPM's forward process, sqrt(abar_t) x0 +
    sqrt(1 - abar_t) n on the beta schedule of ``scheduler`` (any scheduler of the checkpoint: the pipeline's
    sampler or the trainer's DDPMScheduler give the same), then one frozen pass with the caching prompt's
    ``condition`` (1 or B rows): the empty prompt's unless the adapters were trained with another (Table 6).
    The one definition for training and inference."""
    B = latents.shape[0]
    t = torch.full((B,), timestep, dtype=torch.long, device=latents.device)
    noisy = forward_process(scheduler).add_noise(latents, noise.to(latents), t)
    condition = as_condition(condition)
    return capture_features(unet, layers, noisy, t, condition.expand(B) if len(condition) == 1 else condition)
