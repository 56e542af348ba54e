"""What a U-Net call is conditioned on besides the latent and the timestep.

SD 1.x/2.x: the prompt's token embeddings (``encoder_hidden_states``, (B, 77, D)). SDXL adds the pooled text
embedding and six size/crop ids (``added_cond_kwargs``). A ``Condition`` carries both, row for row, so the
trainer, the caching pass and the sampler treat every base alike: they concatenate, select and expand rows
of one object and pass ``**cond.kwargs()`` to the U-Net.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Condition:
    embeds: torch.Tensor  # (B, T, D) text token embeddings
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds (B, P), time_ids (B, 6)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def kwargs(self) -> dict:
        """The U-Net's keyword arguments for this conditioning."""
        return {"encoder_hidden_states": self.embeds, **({"added_cond_kwargs": self.added} if self.added else {})}

    def _map(self, fn) -> "Condition":
        return Condition(fn(self.embeds), {k: fn(v) for k, v in self.added.items()})

    def expand(self, n: int) -> "Condition":
        """A one-row condition as ``n`` rows (views, no copies)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def repeat_rows(self, n: int) -> "Condition":
        """Each row ``n`` times in place: rows (a, b) -> (a, a, b, b) for n = 2."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def to(self, *args, **kwargs) -> "Condition":
        return self._map(lambda t: t.to(*args, **kwargs))

    def where(self, mask: torch.Tensor, other: "Condition") -> "Condition":
        """Row i from ``self`` where ``mask[i]``, else from ``other`` (either may be one row, broadcast)."""
        def pick(a, b):
            return torch.where(mask.view(-1, *[1] * (a.dim() - 1)), a, b)

        return Condition(pick(self.embeds, other.embeds), {k: pick(v, other.added[k]) for k, v in self.added.items()})

    @staticmethod
    def cat(conditions: list["Condition"]) -> "Condition":
        """The rows of ``conditions``, one after the other."""
        first = conditions[0]
        return Condition(torch.cat([c.embeds for c in conditions]),
                         {k: torch.cat([c.added[k] for c in conditions]) for k in first.added})


def as_condition(cond: Condition | torch.Tensor) -> Condition:
    """A Condition, or SD 1.x/2.x's text embeddings alone as one."""
    return cond if isinstance(cond, Condition) else Condition(cond)


def placeholder(unet_config, batch: int, tokens: int = 77, device="cpu", dtype=torch.float32) -> Condition:
    """A condition of the right shapes for a U-Net of this config (zeros; on ``device="meta"``, shapes only):
    for FLOP counts, dry runs and benchmarks, where what the text says does not matter."""
    embeds = torch.zeros(batch, tokens, unet_config.cross_attention_dim, device=device, dtype=dtype)
    if unet_config.addition_embed_type != "text_time":
        return Condition(embeds)
    ids = 6  # original size, crop top-left, target size
    pooled = unet_config.projection_class_embeddings_input_dim - ids * unet_config.addition_time_embed_dim
    return Condition(embeds, {"text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
                              "time_ids": torch.zeros(batch, ids, device=device, dtype=dtype)})
