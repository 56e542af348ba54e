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


class _Batched:
    device: str
    batch_size: int

    def _batched(self, items: list, fn) -> torch.Tensor:
        with torch.inference_mode():
            parts = [fn(items[i:i + self.batch_size]).float().cpu() for i in range(0, len(items), self.batch_size)]
        return torch.cat(parts) if parts else torch.empty(0)


class Clip(_Batched):
    """A CLIP model's projected image and text embeddings, and their cosine: CLIP-I and CLIP-T here, and the
    pipeline's caption-target agreement filter. ``dtype`` applies on a GPU (a CPU runs float32)."""

    def __init__(self, model: str = CLIP, device: str | None = None, batch_size: int = 32, revision: str | None = None,
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoProcessor, CLIPModel

        from dreamcache.models import default_device, resolve

        self.device = device or default_device()
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(resolve(model), revision=revision)
        dtype = dtype if self.device.startswith("cuda") else torch.float32
        self.model = CLIPModel.from_pretrained(resolve(model), revision=revision, dtype=dtype).to(self.device).eval()

    def image(self, images: list[Image.Image]) -> torch.Tensor:
        def run(chunk):
            x = self.processor(images=[im.convert("RGB") for im in chunk], return_tensors="pt").to(self.device)
            return self.model.get_image_features(pixel_values=x["pixel_values"].to(self.model.dtype)).pooler_output
        return self._batched(images, run)

    def text(self, texts: list[str]) -> torch.Tensor:
        """Texts longer than CLIP's 77 tokens are truncated, as CLIP was trained."""
        def run(chunk):
            x = self.processor(text=chunk, padding=True, truncation=True, return_tensors="pt").to(self.device)
            ids, mask = x["input_ids"], x["attention_mask"]
            return self.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        return self._batched(texts, run)

    def score(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        """(N,) cosine of each image with its text (the CLIP score, unscaled)."""
        return torch.nn.functional.cosine_similarity(self.image(images), self.text(texts), dim=-1)


class Embedder(_Batched):
    """DINO and CLIP, loaded once; every method takes a list and returns (N, D) float32 on the CPU."""

    def __init__(self, dino: str = DINO, clip: str = CLIP, device: str | None = None, batch_size: int = 32):
        from transformers import AutoImageProcessor, ViTModel

        from dreamcache.models import default_device, resolve

        self.device = device or default_device()
        self.batch_size = batch_size
        self.dino_processor = AutoImageProcessor.from_pretrained(resolve(dino))
        self.dino_model = ViTModel.from_pretrained(resolve(dino), add_pooling_layer=False).to(self.device).eval()
        self.clip = Clip(clip, self.device, batch_size)

    def dino(self, images: list[Image.Image]) -> torch.Tensor:
        def run(chunk):
            x = self.dino_processor(images=[im.convert("RGB") for im in chunk], return_tensors="pt").to(self.device)
            return self.dino_model(**x).last_hidden_state[:, 0]  # CLS token
        return self._batched(images, run)

    def clip_image(self, images: list[Image.Image]) -> torch.Tensor:
        return self.clip.image(images)

    def clip_text(self, texts: list[str]) -> torch.Tensor:
        return self.clip.text(texts)
