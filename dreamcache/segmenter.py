"""Grounded segmentation: Grounding DINO finds a subject phrase, SAM masks it, the subject is cut out on white.

The pipeline's segment stage makes the training references with it, and personalisation and evaluation make
the user's references with it, so the adapters always see the same kind of input: the subject on pure white,
cropped square around the mask with the same margin. Both models are the ``transformers`` implementations,
which load the official checkpoints.

``KeyedSegmenter`` is the other method (``method: key``): for subjects on a flat backdrop of one colour
(studio shots, renders such as the small world's), the backdrop's colour is keyed out; it reads no text and
loads no model. Both cut out through ``make_reference``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from dreamcache.images import on_white
from dreamcache.models import default_device, resolve


@dataclass(frozen=True)
class GroundingConfig:
    """The models and how they run; the pipeline's ``segment`` section extends it with its quality filters."""

    method: str = "grounded"  # grounded: Grounding DINO + SAM; key: the flat backdrop's colour keyed out (no model)
    detector: str = "IDEA-Research/grounding-dino-base"
    detector_revision: str | None = None
    segmenter: str = "facebook/sam-vit-huge"
    segmenter_revision: str | None = None
    box_threshold: float = 0.35  # Grounding DINO box score (lang-sam's default)
    margin: float = 0.1  # crop margin around the mask, as a fraction of the box side
    batch_size: int = 8
    # Grounding DINO's text, "[CLS] phrase . [SEP]", is padded to this many tokens whatever the phrase, so its
    # shape is one; a phrase that needs more is refused, never truncated (the pipeline drops it as
    # subject_too_long). The pipeline's subjects have at most 8 words (about 10-15 BERT tokens).
    max_text_tokens: int = 32  # the detector's text length: every phrase padded to it, a longer one refused
    dtype: str = "bfloat16"  # Grounding DINO and SAM on GPU; CPU always runs float32
    compile: bool = False  # torch.compile on GPU: pays off over a dataset (minutes to compile), not a few images
    key_distance: float = 60.0  # method key: RGB distance (0-255) from the backdrop above which a pixel is subject

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"segment method {self.method!r}: choose one of {', '.join(METHODS)}")


METHODS = ("grounded", "key")
# The tiny profile: random models give random boxes, so every box is kept.
TINY = {"detector": "tiny:grounding-dino", "segmenter": "tiny:sam", "box_threshold": 0.0, "dtype": "float32"}


def grounding_config(profile: str = "paper", method: str = "grounded") -> GroundingConfig:
    """The segmenter of ``dreamcache personalize`` and ``evaluate``: the paper's models, or the tiny ones; or
    keying (``method="key"``)."""
    return replace(GroundingConfig(), **(TINY if profile == "tiny" else {}), method=method)


def make_segmenter(cfg: GroundingConfig) -> "GroundedSegmenter | KeyedSegmenter":
    """The segmenter ``cfg.method`` names."""
    return KeyedSegmenter(cfg) if cfg.method == "key" else GroundedSegmenter(cfg)


def segmenter_models(cfg: GroundingConfig) -> list[tuple[str, str | None, str]]:
    """(reference, revision, role) of each model the segmenter loads: none for keying."""
    if cfg.method == "key":
        return []
    return [(cfg.detector, cfg.detector_revision, "Grounding DINO"), (cfg.segmenter, cfg.segmenter_revision, "SAM")]


def square_crop_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """Square (x0, y0, x1, y1) around the mask's bounding box plus ``margin`` x its longer side; may extend
    past the image (those pixels become white padding)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = int(np.ceil(max(x1 - x0, y1 - y0) * (1 + 2 * margin)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    return left, top, left + side, top + side


def make_reference(image: np.ndarray, mask: np.ndarray, margin: float, size: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """(size, size, 3) uint8 reference: the subject on white, and the crop box it was cut from.

    The image is resized smoothly and the mask with nearest neighbour, and white is applied after resizing:
    the reference is exactly white wherever the resized mask is 0.
    """
    box = square_crop_box(mask, margin)
    rgb = Image.fromarray(np.where(mask[..., None], image, 255).astype(np.uint8)).crop(box)  # pads with black
    m = Image.fromarray(mask.astype(np.uint8) * 255).crop(box)  # padding is 0 = background
    rgb = np.asarray(rgb.resize((size, size), Image.Resampling.LANCZOS))
    m = np.asarray(m.resize((size, size), Image.Resampling.NEAREST)) > 0
    return np.where(m[..., None], rgb, 255).astype(np.uint8), box


class GroundedModels(NamedTuple):
    det_processor: Any
    detector: Any  # GroundingDinoForObjectDetection
    sam_processor: Any
    sam: Any  # SamModel


def load_grounded_models(cfg: GroundingConfig) -> GroundedModels:
    from transformers import AutoProcessor, GroundingDinoForObjectDetection, SamModel, SamProcessor

    det, seg = resolve(cfg.detector), resolve(cfg.segmenter)
    return GroundedModels(AutoProcessor.from_pretrained(det, revision=cfg.detector_revision),
                          GroundingDinoForObjectDetection.from_pretrained(det, revision=cfg.detector_revision),
                          SamProcessor.from_pretrained(seg, revision=cfg.segmenter_revision),
                          SamModel.from_pretrained(seg, revision=cfg.segmenter_revision))


def text_limit(models: GroundedModels) -> int:
    """The most text tokens the detector reads: its ``max_text_len`` (it cuts longer text silently), its text
    tower's positions and its tokenizer's ``model_max_length``, whichever is smallest."""
    config = models.detector.config
    return min(config.max_text_len, config.text_config.max_position_embeddings,
               models.det_processor.tokenizer.model_max_length)


def detector_text(subject: str) -> str:
    """Grounding DINO's prompt form of a subject phrase: lower case, one period at the end."""
    return subject.lower().strip().rstrip(".") + "."


class SubjectNotFound(ValueError):
    pass


class SubjectTooLong(ValueError):
    pass


class Cutouts:
    """``cutouts`` and ``cutout`` (subjects on white) from a segmenter's ``find``."""

    reads_subject = True  # finds the subject by its phrase (Grounding DINO); False: the phrase is not read

    def cutouts(self, images: list[Image.Image], subject: str, size: int) -> list[tuple[Image.Image, np.ndarray] | None]:
        """One entry per image; None where the segmenter finds no ``subject`` (Grounding DINO: above its thresholds)."""
        images = [on_white(im) for im in images]
        out: list[tuple[Image.Image, np.ndarray] | None] = []
        for image, found in zip(images, self.find(images, [subject] * len(images))):
            if found is None or not found[0].any():
                out.append(None)
                continue
            mask = found[0]
            ref, _ = make_reference(np.asarray(image), mask, self.cfg.margin, size)
            out.append((Image.fromarray(ref), mask))
        return out

    def cutout(self, image: Image.Image, subject: str, size: int) -> tuple[Image.Image, np.ndarray]:
        found = self.cutouts([image], subject, size)[0]
        if found is None:
            raise SubjectNotFound(self.not_found(subject))
        return found

    def not_found(self, subject: str) -> str:
        return (f"could not find {subject!r} in the image (Grounding DINO box threshold {self.cfg.box_threshold}): "
                "name the subject differently with --subject, or pass a reference that is already on white with "
                "--no-segment")


class GroundedSegmenter(Cutouts):
    """``find`` (masks of subject phrases, batched) and ``cutouts`` (subjects on white) on one device."""

    def __init__(self, cfg: GroundingConfig, models: GroundedModels | None = None):
        """``models``: detector and segmenter already built and placed (they run on their own device and in
        their own dtype, eager until ``compile``); default: load ``cfg.detector`` and ``cfg.segmenter`` in
        ``cfg.dtype`` on a GPU, compiled there with ``cfg.compile``, float32 on a CPU."""
        import torch

        self.cfg = cfg
        self.compiled = False  # whether the models are compiled: then every batch is padded to batch_size rows
        loaded = models is None
        if loaded:
            self.device = default_device()
            self.dtype = getattr(torch, cfg.dtype) if self.device == "cuda" else torch.float32
            models = load_grounded_models(cfg)
            for model in (models.detector, models.sam):
                model.to(self.device, self.dtype)
        else:
            weight = next(models.sam.parameters())
            self.device, self.dtype = weight.device, weight.dtype
        limit = text_limit(models)
        if cfg.max_text_tokens > limit:
            raise ValueError(f"max_text_tokens={cfg.max_text_tokens} is more than the detector {cfg.detector} reads "
                             f"(its text holds at most {limit} tokens): set segment.max_text_tokens to at most {limit}")
        self.det_processor, self.detector, self.sam_processor, self.sam = models
        self.detector.eval()
        self.sam.eval()
        # Calls may run in several threads at once (the pipeline actor's resources.segment_calls): their host
        # work overlaps, their device work takes turns.
        self.device_lock = threading.Lock()
        # The detector's tokenizer keeps its padding and truncation as settings of one shared object, set at every
        # call: a phrase counted (no padding) while another thread pads a batch would unpad it. Its calls take turns.
        self.text_lock = threading.Lock()
        if loaded and cfg.compile and self.device == "cuda":
            self.compile()

    def compile(self, backend: str = "inductor") -> None:
        """``torch.compile`` of both models, in place, on any device (``cfg.compile`` does it on a GPU only).
        One static graph each (``dynamic=False``): from here on every call is padded to ``batch_size`` images and
        ``max_text_tokens`` tokens, and SAM runs on every row, so no shape depends on the phrases or on how many
        boxes are found, and nothing compiles again. The detector's image shape follows the images' size: the
        pipeline's targets all have one (``targets.resolution``)."""
        self.detector.compile(backend=backend, dynamic=False)
        self.sam.compile(backend=backend, dynamic=False)
        self.compiled = True

    def describe(self) -> dict[str, Any]:
        """What changes this segmenter's masks: its models, box threshold, crop margin, text bound and dtype
        (evaluation records it with the references it cuts out)."""
        c = self.cfg
        return {"detector": c.detector, "detector_revision": c.detector_revision, "segmenter": c.segmenter,
                "segmenter_revision": c.segmenter_revision, "box_threshold": c.box_threshold, "margin": c.margin,
                "max_text_tokens": c.max_text_tokens, "dtype": str(self.dtype).removeprefix("torch.")}

    def text_tokens(self, subjects: list[str]) -> list[int]:
        """Grounding DINO tokens of each subject phrase's text, [CLS] and [SEP] included."""
        if not subjects:  # the tokenizer refuses an empty batch
            return []
        with self.text_lock:
            ids = self.det_processor.tokenizer([detector_text(s) for s in subjects])["input_ids"]
        return [len(i) for i in ids]

    def find(self, images: list[Image.Image], subjects: list[str]) -> list[tuple[np.ndarray, float, list[float], float] | None]:
        """Per image: (H x W bool mask, SAM score, box xyxy, box score) of its subject phrase, or None when
        Grounding DINO finds no box above ``box_threshold``. No quality filter is applied here. Raises
        ``SubjectTooLong`` for a phrase of more than ``max_text_tokens`` tokens (``text_tokens`` tells first).

        Runs ``batch_size`` images at a time. The processors run on the host, outside the device lock; the
        models, the box choice and the masks' upsampling run on the device.
        """
        bound = self.cfg.max_text_tokens
        for subject, n in zip(subjects, self.text_tokens(subjects)):
            if n > bound:
                raise SubjectTooLong(f"the subject phrase {subject!r} is {n} Grounding DINO tokens, more than the "
                                     f"{bound} its text is padded to: name the subject in fewer words")
        step = self.cfg.batch_size
        return [found for start in range(0, len(images), step)
                for found in self._find_batch(images[start:start + step], subjects[start:start + step])]

    def _find_batch(self, images: list[Image.Image], subjects: list[str]):
        n = len(images)
        if self.compiled and n < self.cfg.batch_size:  # the compiled models see batch_size rows, always
            pad = self.cfg.batch_size - n  # real images (the last one again): their outputs are dropped
            images, subjects = images + images[-1:] * pad, subjects + subjects[-1:] * pad
        text = [detector_text(s) for s in subjects]  # (B, max_text_tokens) ids: one shape whatever the phrases
        with self.text_lock:
            det_inputs = self.det_processor(images=images, text=text, padding="max_length",
                                            max_length=self.cfg.max_text_tokens, truncation=True, return_tensors="pt")
        sam_inputs = self.sam_processor(images=images, return_tensors="pt")
        with self.device_lock:
            return self._locate(det_inputs, sam_inputs, n)

    def _locate(self, det_inputs, sam_inputs, n: int) -> list[tuple[np.ndarray, float, list[float], float] | None]:
        """The models on a batch of B rows whose first ``n`` are real (the rest pad a compiled batch)."""
        import torch

        with torch.inference_mode():
            outputs = self.detector(**det_inputs.to(self.device, self.dtype))  # casts the floating tensors only
            # The box whose best text-token score is highest: what Grounding DINO's post-processing keeps
            # first, without decoding a label for each of its queries. Padding tokens score -inf.
            scores, best = outputs.logits.float().sigmoid().amax(-1).max(-1)  # (B,)
            cx, cy, w, h = outputs.pred_boxes.float()[torch.arange(len(best)), best].unbind(-1)
            size = sam_inputs["original_sizes"].to(self.device).float()  # (B, 2): height, width
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * size[:, [1, 0, 1, 0]]
            # SAM prompts every row with its best box, above the threshold or not, so that its shapes never
            # depend on how many boxes are found; the rows without one are dropped below. The prompt is in the
            # coordinates of SAM's resized input (longest side 1024).
            scale = sam_inputs["reshaped_input_sizes"].to(self.device).float() / size  # (B, 2)
            prompt = boxes * scale[:, [1, 0, 1, 0]]  # (B, 4)
            out = self.sam(pixel_values=sam_inputs["pixel_values"].to(self.device, self.dtype),
                           input_boxes=prompt[:, None].to(self.dtype), multimask_output=False)
            keep = (scores[:n] > self.cfg.box_threshold).nonzero().flatten()  # real rows with a box
            results: list[tuple[np.ndarray, float, list[float], float] | None] = [None] * n
            if len(keep) == 0:
                return results
            masks = self.sam_processor.post_process_masks(  # upsampled to the image and thresholded on the device
                out.pred_masks[keep].float(), sam_inputs["original_sizes"][keep.cpu()],
                sam_inputs["reshaped_input_sizes"][keep.cpu()])
            masks = [m[0, 0].cpu().numpy() for m in masks]
            sam_scores = out.iou_scores[keep].float().reshape(len(keep), -1)[:, 0].tolist()
            boxes, scores = boxes[keep].tolist(), scores[keep].tolist()
        for j, i in enumerate(keep.tolist()):
            results[i] = (masks[j], sam_scores[j], boxes[j], scores[j])
        return results


def key_mask(pixels: np.ndarray, distance: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(mask, backdrop colour, share of the ring that is backdrop) of an (H, W, 3) image in 0-255: the backdrop
    is the median colour of the outer two-pixel ring; the subject, every pixel farther than ``distance`` from
    it, with gaps of up to two pixels closed and holes filled (a subject's own dark stripes may be near a dark
    backdrop), its largest 4-connected part."""
    from scipy import ndimage

    ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3), pixels[:, :2].reshape(-1, 3),
                           pixels[:, -2:].reshape(-1, 3)])
    backdrop = np.median(ring, axis=0)
    flat = float((np.linalg.norm(ring - backdrop, axis=-1) <= distance).mean())
    far = np.linalg.norm(pixels - backdrop, axis=-1) > distance
    far = ndimage.binary_fill_holes(far | ndimage.binary_closing(far, np.ones((3, 3), bool)))
    labels, n = ndimage.label(far)
    if n == 0:
        return far, backdrop, flat
    return labels == 1 + int(np.argmax(ndimage.sum(far, labels, range(1, n + 1)))), backdrop, flat


class KeyedSegmenter(Cutouts):
    """Background keying (``key_mask``): the backdrop is the median colour of the image's outer two-pixel ring,
    the subject what stands out from it by more than ``key_distance`` (RGB, 0-255). For
    subjects on a flat backdrop of one colour; the subject phrase is not read. ``find``'s box score is the
    share of the ring that is backdrop (1.0: a flat backdrop all round), its mask score 1.0."""

    compiled = False
    reads_subject = False

    def __init__(self, cfg: GroundingConfig, models=None):
        self.cfg = cfg

    def describe(self) -> dict[str, Any]:
        return {"method": "key", "key_distance": self.cfg.key_distance, "margin": self.cfg.margin}

    def text_tokens(self, subjects: list[str]) -> list[int]:
        return [0] * len(subjects)  # no text is read: no phrase is too long

    def find(self, images: list[Image.Image], subjects: list[str]) -> list[tuple[np.ndarray, float, list[float], float] | None]:
        return [self._key(np.asarray(im.convert("RGB"), dtype=np.float32)) for im in images]

    def _key(self, pixels: np.ndarray) -> tuple[np.ndarray, float, list[float], float] | None:
        mask, backdrop, flat = key_mask(pixels, self.cfg.key_distance)
        if not mask.any():
            return None
        ys, xs = np.nonzero(mask)
        return mask, 1.0, [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)], flat

    def not_found(self, subject: str) -> str:
        return (f"no subject stands out from the backdrop (keying at RGB distance {self.cfg.key_distance}): use a "
                "reference on a flat backdrop, or the grounded segmenter")
