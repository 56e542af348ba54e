"""How personalised images are sampled: the guidance formulas (paper S4) and the defaults, in one place.

The ``dreamcache`` CLI, evaluation, the validation grids and ``DreamCachePipeline.__call__`` all read their
defaults from here: DDIM with eta 0, 50 steps, joint guidance at text scale 7.5 (the paper's).

Both formulas run through the stock pipeline's classifier-free guidance, u + s (c - u) with s the text scale:
joint guidance is it exactly (u = e(z,0,0), c = e(z,I,T)); combined guidance hands it the pair
``combined_as_cfg`` makes from its three predictions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GUIDANCE = ("joint", "combined")
DEFAULT_GUIDANCE = "joint"
STEPS = 50  # paper: DDIM, 50 steps, eta 0
TEXT_SCALE = 7.5  # paper: the joint scale, and s_T of combined guidance
IMAGE_SCALE = 3.0  # s_I of combined guidance
# Evaluation presets. joint: the paper's joint guidance (the default); official: what the official evaluation
# code ran, combined guidance with a small image scale.
PRESETS = {"joint": {"guidance": "joint", "text_scale": TEXT_SCALE, "image_scale": IMAGE_SCALE},
           "official": {"guidance": "combined", "text_scale": TEXT_SCALE, "image_scale": 0.4}}


def joint_guidance(e_uncond: torch.Tensor, e_full: torch.Tensor, scale: float) -> torch.Tensor:
    """e(z,0,0) + s (e(z,I,T) - e(z,0,0))."""
    return e_uncond + scale * (e_full - e_uncond)


def combined_guidance(e_uncond: torch.Tensor, e_image: torch.Tensor, e_full: torch.Tensor, image_scale: float,
                      text_scale: float) -> torch.Tensor:
    """e(z,0,0) + s_I (e(z,I,0) - e(z,0,0)) + s_T (e(z,I,T) - e(z,I,0))."""
    return e_uncond + image_scale * (e_image - e_uncond) + text_scale * (e_full - e_image)


def combined_as_cfg(e_uncond: torch.Tensor, e_image: torch.Tensor, e_full: torch.Tensor, image_scale: float,
                    text_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, c) with u + s_T (c - u) = ``combined_guidance``: c = e(z,I,T), u = e(z,I,0) + (1 - s_I) / (s_T - 1)
    (e(z,I,0) - e(z,0,0)). Exact in real arithmetic for s_T > 1 (the stock loop guides only then); in floating
    point the two-stage sum rounds differently from the direct formula: about one ulp of the result at the
    usual scales, growing as 1 / (s_T - 1) as s_T nears 1 (fp32: 2e-7 of the result's magnitude at s_T 1.5 to
    7.5, 1e-6 at 1.01, 1e-4 at 1.0001). c stays the fully conditioned prediction, which is what the stock
    loop's ``guidance_rescale`` matches the result's spread to."""
    if not text_scale > 1:
        raise ValueError(f"combined guidance runs through classifier-free guidance, which needs a text scale > 1 "
                         f"(got {text_scale})")
    return e_image + (1 - image_scale) / (text_scale - 1) * (e_image - e_uncond), e_full
