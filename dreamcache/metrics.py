"""Image and text embeddings for the DreamBooth metrics (paper sec. 4.1).

DINO: ViT-S/16's CLS token of the last layer. CLIP-I: CLIP ViT-B/32's projected image embedding. CLIP-T:
the cosine between the projected image and text embeddings. Every score is a cosine similarity of
L2-normalised embeddings; ``pairwise_mean`` averages an image's similarity over all the real images.
"""

from __future__ import annotations

import torch
from PIL import Image

DINO = "facebook/dino-vits16"
CLIP = "openai/clip-vit-base-patch32"


def normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) cosine similarities between the rows of a (N, D) and b (M, D)."""
    return normalise(a) @ normalise(b).T


def pairwise_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) mean cosine of each row of ``a`` with every row of ``b``."""
    return cosine_matrix(a, b).mean(dim=1)


class Embedder:
    """DINO and CLIP, loaded once; every method takes a list and returns (N, D) float32 on the CPU."""

    def __init__(self, dino: str = DINO, clip: str = CLIP, device: str | None = None, batch_size: int = 32):
        from transformers import AutoImageProcessor, AutoProcessor, CLIPModel, ViTModel

        from dreamcache.models import resolve

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.dino_processor = AutoImageProcessor.from_pretrained(resolve(dino))
        self.dino_model = ViTModel.from_pretrained(resolve(dino), add_pooling_layer=False).to(self.device).eval()
        self.clip_processor = AutoProcessor.from_pretrained(resolve(clip))
        self.clip_model = CLIPModel.from_pretrained(resolve(clip)).to(self.device).eval()

    def _batched(self, items: list, fn) -> torch.Tensor:
        with torch.inference_mode():
            parts = [fn(items[i:i + self.batch_size]).float().cpu() for i in range(0, len(items), self.batch_size)]
        return torch.cat(parts) if parts else torch.empty(0)

    def dino(self, images: list[Image.Image]) -> torch.Tensor:
        def run(chunk):
            x = self.dino_processor(images=[im.convert("RGB") for im in chunk], return_tensors="pt").to(self.device)
            return self.dino_model(**x).last_hidden_state[:, 0]  # CLS token
        return self._batched(images, run)

    def clip_image(self, images: list[Image.Image]) -> torch.Tensor:
        def run(chunk):
            x = self.clip_processor(images=[im.convert("RGB") for im in chunk], return_tensors="pt").to(self.device)
            return self.clip_model.get_image_features(pixel_values=x["pixel_values"]).pooler_output
        return self._batched(images, run)

    def clip_text(self, texts: list[str]) -> torch.Tensor:
        def run(chunk):
            x = self.clip_processor(text=chunk, padding=True, truncation=True, return_tensors="pt").to(self.device)
            return self.clip_model.get_text_features(input_ids=x["input_ids"],
                                                     attention_mask=x["attention_mask"]).pooler_output
        return self._batched(texts, run)
