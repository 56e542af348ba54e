"""How personalised images are sampled: the guidance formulas (paper S4) and the defaults, in one place.

The ``dreamcache`` CLI, evaluation, the validation grids and ``DreamCachePipeline.__call__`` all read their
defaults from here: DDIM with eta 0, 50 steps, joint guidance at text scale 7.5 (the paper's).
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
