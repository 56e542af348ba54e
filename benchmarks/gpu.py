"""GPU figures: the pipeline's SDXL and segmentation stages, the trainer's step and personalised generation, in
bf16, on full-size architectures with random weights (speed does not depend on the weights).

    python -m benchmarks --gpu --out DIR                          # every case (measured case times add up to ~12 min on an H100)
    python -m benchmarks --gpu --cases sdxl segment --out DIR
    python -m benchmarks --gpu --cases generate_sdxl --out DIR    # DreamCache on SDXL at 1024 px: overhead per pass
    python -m benchmarks --gpu --tiny --device cpu --out DIR      # the same code on the tiny models (tests)
    python -m benchmarks --gpu-markdown DIR/gpu.json              # BENCHMARKS.md's GPU section from a report

Needs torch, transformers, accelerate, safetensors and diffusers only: no Ray, vLLM, webdataset or network.
Each case drives the project's own code: ``TargetStage`` and ``SegmentStage`` as the pipeline's actors call
them, the trainer's ``Step``, ``DreamCachePipeline``. DIR/gpu.json is rewritten after every case; a case that
fails records its error and the others still run.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import PEAK_BF16, ROOT, clock, hardware, table
from dreamcache.models import default_device
from benchmarks.unet import UNetBench, case_adapter_overhead, case_generation

HERE = Path(__file__).resolve().parent
CASES = ("sdxl", "segment", "train", "generate", "generate_sdxl")
SDXL_MODES = ("eager", "compile", "reduce-overhead", "fp8")
GENERATE_MODES = ("eager", "compile", "reduce-overhead")


@dataclass(frozen=True)
class Sizes:
    sdxl_resolution: int = 1024
    sdxl_steps: int = 25  # paper, supp. S1
    sdxl_batches: tuple[int, ...] = (1, 4, 8)
    segment_resolution: int = 1024
    segment_batch: int = 8
    segment_samples: int = 64
    train_resolution: int = 512
    train_batches: tuple[int, ...] = (8, 16, 32)
    train_steps: int = 3  # timed micro-batches per configuration, after one warm-up
    generate_steps: int = 50
    repeats: int = 3
    # Generation at 512 px varies by a few per cent run to run (on an H100, 1 repeat gave 1.30x, 7 gave 1.01x).
    generate_repeats: int = 7


FULL = Sizes()
TINY = Sizes(sdxl_resolution=64, sdxl_steps=2, sdxl_batches=(1, 2), segment_resolution=96, segment_batch=2,
             segment_samples=4, train_resolution=32, train_batches=(2,), train_steps=1, generate_steps=2, repeats=1,
             generate_repeats=1)

# ------------------------------------------------------------------------------------------ full-size models

# The released checkpoints' architectures (their config files), built with random weights.
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
              sample_size=512, scaling_factor=0.18215)
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def _tokenizer(kind: str):
    """The tiny models' tokenizers stand in for the real ones (which need a download): token count and
    padding to 77 (CLIP) are the same, so is the cost of the text encoders."""
    from dreamcache.models import resolve

    if kind == "clip":
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(resolve("tiny:sd15"), subfolder="tokenizer")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(resolve("tiny:grounding-dino")).tokenizer


def count_parameters(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def sdxl_pipeline(tiny: bool, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreamcache.bases import SDXL

    if tiny:
        from dreamcache.models import resolve

        pipe = StableDiffusionXLPipeline.from_pretrained(resolve("tiny:sdxl"), dtype=dtype)
    else:
        with torch.device(device):  # random init on the GPU: seconds instead of minutes on the host
            unet = SDXL.build_unet(random_init=True, device=device)
            vae = AutoencoderKL(**SDXL_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG))
        tok = _tokenizer("clip")
        scheduler = EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler)
        for m in (unet, vae, text_encoder, text_encoder_2):
            m.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def grounded_models(tiny: bool, device: str, dtype: torch.dtype):
    """Grounding DINO base (Swin-B, BERT-base) and SAM ViT-H with their processors at the real sizes."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SamConfig,
        SamModel,
        SamProcessor,
        SamVisionConfig,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    from dreamcache.segmenter import GroundedModels, load_grounded_models

    if tiny:
        from pipeline.config import build_config

        models = load_grounded_models(build_config("tiny", {}).segment)
    else:
        with torch.device(device):
            detector = GroundingDinoForObjectDetection(GroundingDinoConfig(
                backbone_config=SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                                           window_size=12, image_size=384, out_features=["stage2", "stage3", "stage4"]),
                text_config=BertConfig()))
            sam = SamModel(SamConfig(vision_config=SamVisionConfig(
                hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_dim=5120,
                global_attn_indexes=[7, 15, 23, 31])))
        det_processor = GroundingDinoProcessor(  # the checkpoint's: shortest edge 800, longest 1333
            image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 800, "longest_edge": 1333}),
            tokenizer=_tokenizer("bert"))
        sam_processor = SamProcessor(image_processor=SamImageProcessorPil(  # the checkpoint's: 1024, masks 256
            size={"longest_edge": 1024}, pad_size={"height": 1024, "width": 1024}, mask_size={"longest_edge": 256},
            mask_pad_size={"height": 256, "width": 256}))
        models = GroundedModels(det_processor, detector, sam_processor, sam)
    models.detector.to(device, dtype)
    models.sam.to(device, dtype)
    return models


def sd15_components(tiny: bool, device: str, dtype: torch.dtype):
    """(unet, vae, text_encoder, tokenizer, DDPM scheduler) of SD 1.5, frozen, in ``dtype``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreamcache.bases import CONFIGS

    if tiny:
        from transformers import CLIPTokenizer

        from dreamcache.models import resolve

        path = resolve("tiny:sd15")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    else:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / "sd15_unet.json").read_text()))
            vae = AutoencoderKL(**SD_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        tokenizer, scheduler = _tokenizer("clip"), DDPMScheduler(**SD_SCHEDULER, clip_sample=False)
    for m in (unet, vae, text_encoder):
        m.to(device, dtype).requires_grad_(False).eval()
    return unet, vae, text_encoder, tokenizer, scheduler


# ------------------------------------------------------------------------------------------ measurements

def peak_flops(device: str) -> dict:
    """The data sheet's dense bf16 peak and a measured one (a large bf16 matrix product)."""
    if device != "cuda":
        return {"datasheet_tflops": None, "matmul_tflops": None}
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = min(clock(lambda: [a @ b for _ in range(10)]) for _ in range(3)) / 10
    name = torch.cuda.get_device_name()
    sheet = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return {"datasheet_tflops": sheet and sheet / 1e12, "matmul_tflops": round(2 * n ** 3 / seconds / 1e12, 1)}


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def mfu(flops: float, seconds: float, peak: dict) -> dict:
    achieved = flops / seconds
    out = {"achieved_tflops": round(achieved / 1e12, 1)}
    if peak.get("datasheet_tflops"):
        out["mfu"] = round(achieved / (peak["datasheet_tflops"] * 1e12), 3)
    if peak.get("matmul_tflops"):
        out["of_measured_matmul_peak"] = round(achieved / (peak["matmul_tflops"] * 1e12), 3)
    return out


def peak_memory_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def jpeg_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    """Smooth random pictures (upsampled noise) as JPEG bytes: what the SDXL stage hands to segmentation."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((size, size), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def case_sdxl(tiny: bool, device: str, dtype: torch.dtype, sizes: Sizes, peak: dict, modes: list[str]) -> dict:
    """TargetStage.process (SDXL: text encoders, U-Net x steps with guidance 3.5, VAE decode, JPEG encode) per
    batch size, eager then torch.compile (U-Net and VAE decoder). FLOPs: one image's pipeline call, counted."""
    from pipeline.config import TargetConfig
    from pipeline.targets import TargetStage, compile_sdxl, fp8_layers

    pipe = sdxl_pipeline(tiny, device, dtype)
    R, steps = sizes.sdxl_resolution, sizes.sdxl_steps
    cfg = TargetConfig(model="benchmark", steps=steps, resolution=R, batch_size=max(sizes.sdxl_batches))
    stage = TargetStage(cfg, pipe=pipe)
    out = {"resolution": R, "steps": steps, "guidance_scale": cfg.guidance_scale, "dtype": str(dtype),
           "parameters": {"unet": count_parameters(pipe.unet), "vae": count_parameters(pipe.vae),
                          "text_encoders": count_parameters(pipe.text_encoder, pipe.text_encoder_2)}}

    def call(n: int, k: int):
        return pipe(prompt=["a ceramic teapot on a wooden table"] * n, guidance_scale=cfg.guidance_scale,
                    num_inference_steps=k, height=R, width=R, output_type="pil")

    one, two = flops_of(lambda: call(1, 1)), flops_of(lambda: call(1, 2))  # also the first warm-up
    unet_step = two - one
    per_image = one + (steps - 1) * unet_step
    out["flop_per_image"] = per_image
    out["tflop_per_image"] = round(per_image / 1e12, 1)
    out["unet_tflop_per_step"] = round(unet_step / 1e12, 2)  # two rows: unconditional and conditional
    out["other_tflop_per_image"] = round((one - unet_step) / 1e12, 2)  # text encoders + VAE decode
    rows = [{"key": f"k{i}", "caption": f"a ceramic teapot number {i} on a wooden table", "seed": i}
            for i in range(max(sizes.sdxl_batches))]
    out["runs"] = []
    compared = max(sizes.sdxl_batches)  # images compared between bf16 and FP8, from the same seeds (a compiled shape)

    def images(n: int) -> torch.Tensor:  # the first n rows' images, in [0, 1], seeded per sample as the stage does
        generators = [torch.Generator(device).manual_seed(int(r["seed"])) for r in rows[:n]]
        return torch.from_numpy(pipe(prompt=[r["caption"] for r in rows[:n]], guidance_scale=cfg.guidance_scale,
                                     num_inference_steps=steps, height=R, width=R, generator=generators,
                                     output_type="np").images)

    bf16 = None
    for mode in sorted(set(modes), key=SDXL_MODES.index):  # FP8 last: it quantizes the U-Net for good
        if mode != "eager":  # each batch size compiled for its shape; a fresh cache per mode (dynamo's limit: 8)
            torch._dynamo.reset()
            compile_sdxl(pipe, mode if mode in ("reduce-overhead", "max-autotune") else None, fp8=mode == "fp8")
        if mode == "fp8":
            out["fp8"] = {"layers": len(fp8_layers(getattr(pipe.unet, "_orig_mod", pipe.unet)))}
        for n in sorted(sizes.sdxl_batches, reverse=mode != "eager"):  # the largest first: the key figure
            warm = clock(lambda: call(n, 2))  # compiles, on the compiled run's first call per shape
            seconds = clock(lambda: stage.process(rows[:n]))
            out["runs"].append({"mode": mode, "batch": n, "seconds": round(seconds, 3), "warmup_s": round(warm, 1),
                                "images_per_s": round(n / seconds, 3), **mfu(per_image * n, seconds, peak)})
            print(f"  sdxl {mode} batch {n}: {n / seconds:.3f} images/s", file=sys.stderr, flush=True)
        if mode == "compile" or (mode == "fp8" and bf16 is not None):
            got = images(compared)
            if mode != "fp8":
                bf16 = got
            elif bf16 is not None:  # FP8's images against bf16's (compiled), pixel values 0-255
                diff = (got - bf16).abs() * 255
                mse = float(((got - bf16) ** 2).mean())
                out["fp8"].update(images=compared, mean_abs_diff=round(float(diff.mean()), 3),
                                  max_abs_diff=round(float(diff.max()), 1),
                                  psnr_db=round(10 * math.log10(1 / mse), 2) if mse > 0 else None)
        if mode == "eager":  # an actor running two calls at once: JPEG encoding overlaps the next call
            n = max(sizes.sdxl_batches)
            out["calls"] = [{"calls": k, **calls_rate(stage, [rows[:n]] * 4, k)} for k in (1, 2)]
            print(f"  sdxl calls: {out['calls']}", file=sys.stderr, flush=True)
    best = max(out["runs"], key=lambda r: r["images_per_s"])
    out["best"] = {k: best[k] for k in ("mode", "batch", "images_per_s")}
    out["peak_memory_gib"] = peak_memory_gib(device)
    return out


# Subject phrases of 1 to 9 words: Grounding DINO's text differs in length for each, as the captions' do.
SEGMENT_PHRASES = ("teapot", "red ceramic teapot", "a small brass bell on a string", "dog", "two green apples",
                   "a very old wooden rocking chair with a cushion", "hat", "blue glass vase with dried flowers")


def case_segment(tiny: bool, device: str, dtype: torch.dtype, sizes: Sizes, modes: list[str] = ("eager",)) -> dict:
    """SegmentStage.process on R px targets (Grounding DINO base finds the subject, SAM ViT-H masks it, the
    reference is cut out and encoded), each sample with a subject phrase drawn from SEGMENT_PHRASES and the box
    threshold at the first batch's lower quartile of detector scores, so batches differ in text and in how many
    boxes they find, as a dataset's do; then the same batch's processors alone (CPU) and models alone (GPU), to
    show which bounds the stage. Compiled, the graphs added after the warm-up are counted (0: one shape)."""
    import random

    import numpy as np
    from PIL import Image
    from torch._dynamo.utils import counters

    from dreamcache.segmenter import detector_text
    from pipeline.config import build_config
    from pipeline.segment import SegmentStage

    models = grounded_models(tiny, device, dtype)
    cfg = replace(build_config("tiny", {}).segment, batch_size=sizes.segment_batch, reference_size=512,
                  detector="benchmark", segmenter="benchmark")  # tiny profile's filters: keep every mask
    stage = SegmentStage(cfg, models=models)
    n, B, R = sizes.segment_samples, sizes.segment_batch, sizes.segment_resolution
    draw = random.Random(0)
    rows = [{"key": f"k{i}", "target": jpg, "subject": draw.choice(SEGMENT_PHRASES)}
            for i, jpg in enumerate(jpeg_images(n, R))]
    images = [Image.open(io.BytesIO(r["target"])).convert("RGB") for r in rows[:B]]
    text = [detector_text(r["subject"]) for r in rows[:B]]

    def det_inputs():
        return stage.det_processor(images=images, text=text, padding="max_length", max_length=cfg.max_text_tokens,
                                   truncation=True, return_tensors="pt")

    with torch.inference_mode():  # random weights: a threshold that some boxes of a batch miss
        scores = stage.detector(**det_inputs().to(device, dtype)).logits.float().sigmoid().amax(-1).max(-1)[0]
    stage.cfg = replace(stage.cfg, box_threshold=float(scores.quantile(0.25)) - 1e-6)
    stage.process(rows[:B])  # warm-up
    batches = [rows[i:i + B] for i in range(0, n, B)]
    found = [f is not None for b in batches
             for f in stage.find([Image.open(io.BytesIO(r["target"])).convert("RGB") for r in b],
                                 [r["subject"] for r in b])]
    out = {"resolution": R, "batch": B, "samples": n, "dtype": str(dtype),
           "parameters": {"grounding_dino": count_parameters(models.detector), "sam": count_parameters(models.sam)},
           "subjects": list(SEGMENT_PHRASES), "box_threshold": round(stage.cfg.box_threshold, 4),
           "boxes_found": round(sum(found) / len(found), 3), "calls": []}
    for calls in (1, 2, 4):  # threads of one actor (resources.segment_calls): host work overlaps the models
        rate = max((calls_rate(stage, batches, calls) for _ in range(max(1, sizes.repeats - 1))),
                   key=lambda r: r["rows_per_s"])
        out["calls"].append({"calls": calls, **rate})
        print(f"  segment, {calls} calls: {rate['rows_per_s']} samples/s", file=sys.stderr, flush=True)
    out["stage_samples_per_s"] = max(c["rows_per_s"] for c in out["calls"])
    # The parts of one batch: host work (decoding, processors, cut-out and encodes), then the models alone.
    decode = min(clock(lambda: [Image.open(io.BytesIO(r["target"])).convert("RGB") for r in rows[:B]])
                 for _ in range(2))
    det_prep = min(clock(det_inputs) for _ in range(2))
    sam_prep = min(clock(lambda: stage.sam_processor(images=images, return_tensors="pt")) for _ in range(2))
    det_in, sam_in = det_inputs(), stage.sam_processor(images=images, return_tensors="pt")
    first = stage.find(images, [r["subject"] for r in rows[:B]])
    finish = min(clock(lambda: [stage._finish(np.asarray(im), *f) for im, f in zip(images, first) if f])
                 for _ in range(2))
    located = min(clock(lambda: stage._locate(det_in, sam_in, B)) for _ in range(sizes.repeats))
    det_in, sam_in = det_in.to(device, dtype), sam_in.to(device, dtype)  # in place (BatchFeature.to)
    boxes = torch.tensor([[[R * 0.25, R * 0.25, R * 0.75, R * 0.75]]] * B, device=device, dtype=dtype)
    with torch.inference_mode():
        det = min(clock(lambda: stage.detector(**det_in)) for _ in range(sizes.repeats))
        sam = min(clock(lambda: stage.sam(pixel_values=sam_in["pixel_values"], input_boxes=boxes,
                                          multimask_output=False)) for _ in range(sizes.repeats))
    out.update({"detector_input": list(det_in["pixel_values"].shape[-2:]),
                "host_s_per_sample": {"decode": round(decode / B, 4), "processors": round((det_prep + sam_prep) / B, 4),
                                      "finish": round(finish / B, 4)},
                "device_s_per_sample": round(located / B, 4),
                "grounding_dino_s_per_sample": round(det / B, 4), "sam_s_per_sample": round(sam / B, 4),
                "models_samples_per_s": round(B / (det + sam), 2)})
    if "compile" in modes:  # segment.compile: the same batches through compiled models
        stage.compile()
        warm = clock(lambda: stage.process(rows[:B]))  # compiles: one graph per model piece
        graphs = counters["stats"]["unique_graphs"]
        # Host tensors, as the stage hands them over: moved inside _locate's inference mode, as the graphs were
        # compiled (tensors moved outside it differ in dispatch keys, and would compile again).
        host_in = det_inputs(), stage.sam_processor(images=images, return_tensors="pt")
        compiled = min(clock(lambda: stage._locate(*host_in, B)) for _ in range(sizes.repeats))
        rate = max((calls_rate(stage, batches, 2) for _ in range(max(1, sizes.repeats - 1))),
                   key=lambda r: r["rows_per_s"])
        out["compiled"] = {"device_s_per_sample": round(compiled / B, 4), "compile_s": round(warm, 1),
                           "graphs_after_warmup": counters["stats"]["unique_graphs"] - graphs, "calls": 2, **rate}
        print(f"  segment compiled: {out['compiled']}", file=sys.stderr, flush=True)
    out["peak_memory_gib"] = peak_memory_gib(device)
    return out


def calls_rate(stage, batches: list[list[dict]], calls: int) -> dict:
    """Rows per second through ``stage.process`` with ``calls`` batches in flight at once, in threads, as a Ray
    actor with ``max_concurrent_calls_per_actor=calls`` runs them."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(calls) as pool:
        seconds = clock(lambda: list(pool.map(stage.process, batches)))
    return {"rows_per_s": round(sum(map(len, batches)) / seconds, 3), "seconds": round(seconds, 3)}


class Phases:
    """Time spent in each named module's forward during one call, from events recorded in forward hooks (CUDA
    events on a GPU, so nothing synchronises mid-call); whatever is not inside a hooked forward (the backward
    pass, the optimizer, glue) is reported as ``rest``."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: str):
        self.modules, self.cuda = modules, device == "cuda"

    def stamp(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a

    def __call__(self, fn) -> dict[str, float]:
        spans: list[list] = []  # [name, start, end], in call order

        def enter(name: str):
            return lambda module, args: spans.append([name, self.stamp(), None])

        def leave(name: str):
            def hook(module, args, output):
                next(s for s in reversed(spans) if s[0] == name and s[2] is None)[2] = self.stamp()
            return hook

        handles = [h for name, module in self.modules.items()
                   for h in (module.register_forward_pre_hook(enter(name)),
                             module.register_forward_hook(leave(name), always_call=True))]  # the caching pass ends by an exception
        try:
            start = self.stamp()
            fn()
            end = self.stamp()
        finally:
            for h in handles:
                h.remove()
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for i, (name, a, b) in enumerate(spans):
            key = f"{name}#{sum(1 for s in spans[:i] if s[0] == name) + 1}"
            out[key] = round(self.seconds(a, b), 4)
        out["rest"] = round(self.seconds(start, end) - sum(out.values()), 4)
        return out


def case_train(tiny: bool, device: str, dtype: torch.dtype, sizes: Sizes, peak: dict) -> dict:
    """The trainer's micro-batch (training/train.py's Step: VAE encode of target and reference, text encoder,
    caching pass, forward with the cache under bf16 autocast, backward into the fp32 adapters) and one fused
    AdamW step, per micro-batch size, with and without gradient checkpointing; then at the largest micro-batch
    with the target latents cached and the reference encoded at every step (eager, --compile, and --compile with
    channels-last), and the same three with the reference views cached too (--reference-latents); --compile is
    inductor on a GPU, aot_eager elsewhere (which tests the path, not its speed)."""
    from dreamcache.adapter import install_adapters, trainable_parameters
    from training.step import Step
    from training.config import TrainConfig

    from dreamcache.generation import DreamCachePipeline

    unet, vae, text_encoder, tokenizer, scheduler = sd15_components(tiny, device, dtype)
    pipe = DreamCachePipeline.from_modules(scheduler, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    torch.manual_seed(0)
    install_adapters(unet)
    params = trainable_parameters(unet)
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)  # as the trainer's
    R = sizes.train_resolution
    backend = "inductor" if device == "cuda" else "aot_eager"

    def batch_of(B: int, cached: str = "") -> dict:
        """B samples; ``cached``: "targets" (their latent distributions: the latent cache) or "targets+references"
        (and the references' pre-drawn views, encoded), else images."""
        g = torch.Generator().manual_seed(B)
        side = R // 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (B, vae.config.latent_channels, side, side)
        batch = {"key": [f"k{i}" for i in range(B)], "caption": ["a ceramic teapot on a wooden table"] * B}
        if "references" in cached:
            batch["reference_latent"] = torch.randn(*shape, generator=g).half()
        else:
            batch["reference"] = torch.rand(B, 3, R, R, generator=g) * 2 - 1
        if cached:
            batch["target_mean"] = torch.randn(*shape, generator=g).half()
            batch["target_std"] = (torch.rand(*shape, generator=g) * 0.01).half()
        else:
            batch["target"] = torch.rand(B, 3, R, R, generator=g) * 2 - 1
        return batch

    one = Step(TrainConfig(base="benchmark", resolution=R, micro_batch=1, bf16=dtype == torch.bfloat16), pipe,
               scheduler, torch.device(device))
    per_sample = {cached: flops_of(lambda: one.loss(unet, batch_of(1, cached), 0, backward_scale=1.0))
                  for cached in ("", "targets", "targets+references")}  # forward and backward
    opt.zero_grad(set_to_none=True)
    runs = []
    largest = max(sizes.train_batches)
    configs = [(checkpointing, B, "", False, False) for checkpointing in (False, True) for B in sizes.train_batches]
    # At the largest micro-batch: the latent cache; the reference encoded every step (the paper's distribution)
    # compiled, then channels-last too; the pre-drawn reference views, eager, compiled, compiled channels-last.
    configs += [(False, largest, "targets", False, False), (False, largest, "targets", True, False),
                (False, largest, "targets", True, True), (False, largest, "targets+references", False, False),
                (False, largest, "targets+references", True, False), (False, largest, "targets+references", True, True)]
    for checkpointing, B, cached, compiled, channels_last in configs:
        (unet.enable_gradient_checkpointing if checkpointing else unet.disable_gradient_checkpointing)()
        for module in (unet, vae):
            module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        cfg = TrainConfig(base="benchmark", resolution=R, micro_batch=B, grad_checkpointing=checkpointing,
                          bf16=dtype == torch.bfloat16, compile=compiled, compile_backend=backend,
                          channels_last=channels_last)
        trainer = Step(cfg, pipe, scheduler, torch.device(device))
        if compiled:
            torch._dynamo.reset()  # each configuration compiles afresh (dynamo's limit: 8 graphs per function)
        model = torch.compile(unet, backend=backend, dynamic=False) if compiled else unet
        batch = batch_of(B, cached)

        def micro_batches(k: int):
            for i in range(k):
                trainer.loss(model, batch, i, backward_scale=1.0)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        run = {"micro_batch": B, "gradient_checkpointing": checkpointing,
               "target_latents": "cached" if cached else "encoded",
               "reference_latents": "cached" if "references" in cached else "encoded",
               "compile": backend if compiled else None, "channels_last": channels_last}
        reset_peak_memory(device)
        try:
            started = time.monotonic()
            micro_batches(1)  # warm-up (and compiling)
            if compiled:
                run["compile_s"] = round(time.monotonic() - started, 1)
            seconds = clock(lambda: micro_batches(sizes.train_steps)) / sizes.train_steps
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            run["error"] = "out of memory"
        else:
            rate = B / seconds
            run.update({"seconds_per_micro_batch": round(seconds, 3), "samples_per_s": round(rate, 1),
                        **mfu(per_sample[cached] * B, seconds, peak), "peak_memory_gib": peak_memory_gib(device),
                        "projected_gpu_hours_25k_x_128": round(25_000 * 128 / rate / 3600, 2)})
            if device == "cuda" and B == largest and not checkpointing:
                run["host_syncs_per_micro_batch"] = host_syncs(lambda: trainer.loss(model, batch, 0, backward_scale=1.0))
                opt.zero_grad(set_to_none=True)
            if B == largest and not checkpointing and not compiled:  # where one micro-batch's time goes
                phases = Phases({"vae_encoder": vae.encoder, "text_encoder": text_encoder, "unet": unet}, device)
                run["phases_s"] = phases(lambda: trainer.loss(model, batch, 0, backward_scale=1.0))
                opt.zero_grad(set_to_none=True)
        runs.append(run)
        print(f"  train {run}", file=sys.stderr, flush=True)
    unet.disable_gradient_checkpointing()
    for module in (unet, vae):
        module.to(memory_format=torch.contiguous_format)
    ok = [r for r in runs if "samples_per_s" in r]
    return {"resolution": R, "dtype": str(dtype), "adapter_parameters": sum(p.numel() for p in params),
            "flop_per_sample": per_sample[""], "tflop_per_sample": round(per_sample[""] / 1e12, 2),
            "tflop_per_sample_latents_cached": round(per_sample["targets"] / 1e12, 2),
            "tflop_per_sample_references_cached": round(per_sample["targets+references"] / 1e12, 2),
            "flop_per_sample_cached": {k or "none": v for k, v in per_sample.items()}, "runs": runs,
            "best": max(ok, key=lambda r: r["samples_per_s"]) if ok else None}


def host_syncs(fn) -> int:
    """How many times ``fn`` makes the host wait for the GPU (torch.cuda.set_sync_debug_mode's warnings)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def case_generate(tiny: bool, device: str, dtype: torch.dtype, sizes: Sizes, base: str = "sd15",
                  modes: list[str] = ("eager",), backend: str = "inductor") -> dict:
    """The base's DreamCache pipeline end to end (text encoders, U-Net x steps with joint guidance, VAE decode)
    against the same pipeline without a cache (the base model), eager and then with the U-Net compiled for
    sampling in each of ``modes`` ("compile", "reduce-overhead": CUDA graphs too); and the U-Net-level cases:
    reference every step, adapter overhead. ``base``: sd15 (512 px) or sdxl (1024 px, its spec's adapter layers)."""
    import numpy as np
    from diffusers import DDIMScheduler
    from PIL import Image

    from dreamcache.adapter import adapter_modules, install_adapters
    from dreamcache.bases import SPECS
    from dreamcache.generation import DreamCachePipeline, DreamCacheXLPipeline

    spec = SPECS[base]
    if spec.family == "sdxl":
        stock = sdxl_pipeline(tiny, device, dtype)
        modules = {k: v for k, v in stock.components.items() if v is not None and k != "scheduler"}
        scheduler, cls = stock.scheduler, DreamCacheXLPipeline
    else:
        unet, vae, text_encoder, tokenizer, scheduler = sd15_components(tiny, device, dtype)
        modules, cls = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}, DreamCachePipeline
    unet = modules["unet"]
    torch.manual_seed(0)
    install_adapters(unet, spec.layers)
    for proc in adapter_modules(unet).values():
        proc.to(device, dtype)
    pipe = cls.from_modules(DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False), **modules)
    pipe.set_progress_bar_config(disable=True)
    pipe.use_installed_adapters("benchmark")
    R, steps = pipe.resolution, sizes.generate_steps
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 255, (R, R, 3), dtype=np.uint8))
    prompt = "a dog in the snow"
    out = {"base": spec.name, "resolution": R, "steps": steps, "dtype": str(dtype), "guidance": "joint",
           **generation_times(pipe, reference, prompt, steps, sizes.generate_repeats)}
    out["profile"] = profile_guided(pipe, pipe.cache_reference(reference), prompt, device)
    for mode in modes:  # the same comparison with the U-Net compiled for sampling (both pipelines alike)
        if mode != "eager":
            torch._dynamo.reset()  # each mode compiles afresh
            pipe.compile(None if mode == "compile" else mode, backend)
            out.setdefault("compiled", {})[mode] = generation_times(pipe, reference, prompt, steps,
                                                                    sizes.generate_repeats)
            print(f"  generate {mode}: {out['compiled'][mode]}", file=sys.stderr, flush=True)
    pipe.unet = pipe.eager_unet
    bench = UNetBench(R // pipe.vae_scale_factor, unet=unet)
    out["adapter_overhead"] = case_adapter_overhead(bench, max(5, 5 * sizes.generate_repeats))
    out["unet_level"] = case_generation(bench, steps=steps, repeats=sizes.generate_repeats, project_to=steps)
    out["peak_memory_gib"] = peak_memory_gib(device)
    return out


def generation_times(pipe, reference, prompt: str, steps: int, repeats: int) -> dict:
    """The pipeline without a cache (the base model) against personalised generation, caching included, after a
    warm-up (which compiles, for a compiled U-Net): the fastest of ``repeats`` and the ratio by medians."""
    def base():
        pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))

    def personalised():
        pipe(prompt, cache=pipe.cache_reference(reference), num_inference_steps=steps,
             generator=torch.Generator().manual_seed(0))

    warm = clock(base) + clock(personalised)
    times: dict[str, list[float]] = {"base": [], "personalised": [], "caching": []}
    for _ in range(repeats):  # interleaved, so drift in the machine's speed hits both alike
        times["base"].append(clock(base))
        times["personalised"].append(clock(personalised))
        times["caching"].append(clock(lambda: pipe.cache_reference(reference)))
    best = {k: min(v) for k, v in times.items()}
    return {"base_s": round(best["base"], 3), "personalised_s": round(best["personalised"], 3),
            "caching_s": round(best["caching"], 4), "warmup_s": round(warm, 1),
            "personalised_vs_base": round(best["personalised"] / best["base"], 3),
            "median_personalised_vs_base": round(statistics.median(times["personalised"]) /
                                                 statistics.median(times["base"]), 3)}


def profile_guided(pipe, cache, prompt: str, device: str, top: int = 8) -> dict:
    """One denoising step's U-Net call, the base model's (two rows: unconditional and text, as classifier-free
    guidance calls it) against the same call with the cache on the text row (joint guidance), each under
    torch.profiler after a warm-up: operators and GPU kernels launched, the time they take, and the operators
    the guided call adds (by name: count and time)."""
    from torch.profiler import ProfilerActivity, profile

    from dreamcache.generation import GuidedUNet

    unet = pipe.unet
    side = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, side, side, device=device, dtype=unet.dtype)
    t = torch.full((2,), 500, device=device)
    condition = pipe.encode(["", prompt]).kwargs()
    features = {k: v.to(device, unet.dtype) for k, v in cache.features.items() if k in unet.dreamcache_layers}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])

    def guided():
        with GuidedUNet(unet, features, "joint", 1.0, 7.5, guided=lambda: True):
            unet(x, t, **condition)

    def summary(fn) -> tuple[dict, dict]:
        with torch.no_grad():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
        events = prof.key_averages()
        gpu = device == "cuda"
        ops = {e.key: (e.count, (e.self_device_time_total if gpu else e.self_cpu_time_total) / 1e3)
               for e in events if e.key.startswith("aten::")}
        kernels = sum(e.count for e in events if gpu and e.device_type.name == "CUDA" and e.self_device_time_total)
        return ops, {"operators": sum(c for c, _ in ops.values()), "kernels": kernels,
                     "ms": round(sum(ms for _, ms in ops.values()), 3)}

    (base_ops, base), (guided_ops, with_cache) = summary(lambda: unet(x, t, **condition)), summary(guided)
    added = {name: (count - base_ops.get(name, (0, 0.0))[0], ms - base_ops.get(name, (0, 0.0))[1])
             for name, (count, ms) in guided_ops.items()}
    added = sorted(((n, c, ms) for n, (c, ms) in added.items() if c > 0), key=lambda r: -r[2])[:top]
    return {"timed": "GPU kernel time" if device == "cuda" else "CPU time (host)", "base": base, "guided": with_cache,
            "added": [{"operator": n, "count": c, "ms": round(ms, 3)} for n, c, ms in added]}


# ------------------------------------------------------------------------------------------ report

BEGIN, END = "<!-- python -m benchmarks --gpu: begin -->", "<!-- python -m benchmarks --gpu: end -->"
GOALS = {"sdxl_images_per_s": 1.2, "adapter_overhead": 1.05, "personalised_vs_base": 1.05, "train_gpu_hours": 8.0}


def commands(case: dict) -> str:
    cmds = case["command"] if isinstance(case["command"], list) else [case["command"]]
    return ("Command: " if len(cmds) == 1 else "Commands: ") + ", ".join(f"`{c}`" for c in cmds) + "."


def markdown(report: dict) -> str:
    c, h, peak = report["cases"], report["hardware"], report["peak"]
    runs = peak.get("matmul_tflops_runs")
    lines = [BEGIN, "", "## GPU figures (`python -m benchmarks --gpu`)", "",
             f"Hardware: {h['device']}, torch {h['torch']}, CUDA {h.get('cuda')}, transformers "
             f"{h.get('transformers')}, diffusers {h.get('diffusers')}, Python {h['python']}. Run started "
             f"{report['started']}. bf16, full-size architectures with random weights. Peak: data sheet "
             f"{peak.get('datasheet_tflops')} TFLOP/s dense bf16, measured {peak.get('matmul_tflops')} TFLOP/s "
             "(8192^3 bf16 matrix product" + (f"; {', '.join(map(str, runs))} in the runs" if runs else "") +
             "); MFU is against the data sheet. Each case below names the command that measured it.", ""]
    for name in CASES:
        if name in c and "error" in c[name]:
            lines += [f"### {name}: failed", "", "```", c[name]["error"].strip()[-1500:], "```", ""]
    if "sdxl" in c and "runs" in c["sdxl"]:
        x = c["sdxl"]
        lines += [f"### SDXL targets: {x['resolution']} px, {x['steps']} steps, guidance {x['guidance_scale']} "
                  f"(goal: at least {GOALS['sdxl_images_per_s']} images/s)", "",
                  f"`TargetStage.process` (text encoders, U-Net with two guidance rows, VAE decode in bf16, JPEG "
                  f"encode). {x['tflop_per_image']} TFLOP per image ({x['unet_tflop_per_step']} per U-Net step, "
                  f"{x['other_tflop_per_image']} for the text encoders and VAE decode). Compiled: fused q/k/v, "
                  "channels-last, `torch.compile` of the U-Net and the VAE decoder, one static shape per batch size. "
                  + commands(x), "",
                  *table(["mode", "batch", "seconds per call", "images/s", "TFLOP/s", "MFU", "first call (compile)"],
                         [[r["mode"], r["batch"], r["seconds"], f"**{r['images_per_s']}**", r["achieved_tflops"],
                           r.get("mfu", "-"), f"{r['warmup_s']} s"] for r in x["runs"]]), ""]
    if "sdxl" in c and "images" in c["sdxl"].get("fp8", {}):
        f = c["sdxl"]["fp8"]
        lines += [f"FP8 (`targets.fp8`, torchao float8 activations and weights scaled per row, on {f['layers']} "
                  f"linear layers, compiled): {f['images']} images from the same seeds against compiled bf16's differ "
                  f"by {f['mean_abs_diff']} on average and {f['max_abs_diff']} at most (pixel values 0-255), PSNR "
                  f"{f['psnr_db'] if f['psnr_db'] is not None else 'infinite (identical images)'} dB. With random "
                  "weights: the deviation of trained weights is not measured here.", ""]
    if "sdxl" in c and c["sdxl"].get("calls"):
        k = c["sdxl"]["calls"]
        lines += [f"Eager, batch {max(r['batch'] for r in c['sdxl']['runs'])}, four calls through one stage: "
                  + ", ".join(f"{r['calls']} call{'s' if r['calls'] > 1 else ''} at a time {r['rows_per_s']} images/s"
                              for r in k)
                  + ". A second call in flight lets one call's JPEG encoding overlap the next call's denoising, but "
                  "its thread competes with the denoising loop's kernel launches for the interpreter: slower here, "
                  "so SDXL actors run one call at a time.", ""]
    if "segment" in c and "calls" in c["segment"]:
        s = c["segment"]
        host = s["host_s_per_sample"]
        lines += [f"### Grounding DINO base + SAM ViT-H on {s['resolution']} px targets", "", commands(s), "",
                  f"`SegmentStage.process`, batch {s['batch']}, {s['samples']} samples, with 1 to "
                  f"{max(r['calls'] for r in s['calls'])} calls at a time in one process (threads, as a Ray actor "
                  "with `resources.segment_calls`): host work overlaps the models, which take turns."
                  + (f" Subject phrases of 1 to 9 words drawn per sample, box threshold {s['box_threshold']} "
                     f"({s['boxes_found']:.0%} of the samples have a box)" if "subjects" in s else
                     " One subject phrase and every box found: the compiled figures are the best case, unconfirmed "
                     "for varied subjects and box counts")
                  + (f"; compiled, {s['compiled']['graphs_after_warmup']} graphs added after the warm-up."
                     if "graphs_after_warmup" in s.get("compiled", {}) else "."), "",
                  *table(["calls at a time", "samples/s"], [[r["calls"], f"**{r['rows_per_s']}**"] for r in s["calls"]]),
                  "", *table(["part", "per sample", "samples/s"],
                             [["host: JPEG decode", f"{host['decode']} s", round(1 / host["decode"], 1)],
                              ["host: both processors", f"{host['processors']} s", round(1 / host["processors"], 1)],
                              ["host: filters, cut-out, PNG/JPEG encodes", f"{host['finish']} s",
                               round(1 / host["finish"], 1)],
                              ["device: both models, box choice, mask upsampling", f"{s['device_s_per_sample']} s",
                               round(1 / s["device_s_per_sample"], 1)],
                              [f"Grounding DINO forward ({s['detector_input'][0]}x{s['detector_input'][1]} input)",
                               f"{s['grounding_dino_s_per_sample']} s", round(1 / s["grounding_dino_s_per_sample"], 1)],
                              ["SAM forward (image encoder + one box)", f"{s['sam_s_per_sample']} s",
                               round(1 / s["sam_s_per_sample"], 1)]]
                             + ([["device, `segment.compile` (both models compiled in "
                                  f"{s['compiled']['compile_s']} s)", f"{s['compiled']['device_s_per_sample']} s",
                                  round(1 / s["compiled"]["device_s_per_sample"], 1)],
                                 ["`SegmentStage.process` compiled, 2 calls at a time", "",
                                  f"**{s['compiled']['rows_per_s']}**"]] if "compiled" in s else [])), ""]
    if "train" in c and "runs" in c["train"]:
        t = c["train"]
        lines += [f"### Trainer step: {t['resolution']} px, SD 1.5 (goal: at most {GOALS['train_gpu_hours']} "
                  "GPU-hours for 25k steps x 128)", "",
                  *table(["micro-batch", "gradient checkpointing", "target latents", "reference latents", "compile",
                          "channels-last", "s per micro-batch", "samples/s", "MFU", "peak memory", "GPU-hours, 25k x 128"],
                         [[r["micro_batch"], "yes" if r["gradient_checkpointing"] else "no",
                           r.get("target_latents", "encoded"), r.get("reference_latents", "encoded"),
                           f"{r['compile']} ({r['compile_s']} s)" if r.get("compile") else "no",
                           "yes" if r.get("channels_last") else "no",
                           r.get("seconds_per_micro_batch", r.get("error")), r.get("samples_per_s", "-"), r.get("mfu", "-"),
                           f"{r['peak_memory_gib']} GiB" if r.get("peak_memory_gib") is not None else "-",
                           f"**{r['projected_gpu_hours_25k_x_128']}**" if "projected_gpu_hours_25k_x_128" in r else "-"]
                          for r in t["runs"]]), "",
                  f"{t['tflop_per_sample']} TFLOP per sample, forward and backward ("
                  + (t["flop_count"] if "flop_count" in t else "FlopCounterMode over the trainer's Step.loss, this run")
                  + "). " + commands(t), ""]
        syncs = [r for r in t["runs"] if "host_syncs_per_micro_batch" in r]
        if syncs:
            lines += ["Host synchronisations per micro-batch (`torch.cuda.set_sync_debug_mode`): " + ", ".join(
                f"{r['host_syncs_per_micro_batch']} (targets {r['target_latents']}, references {r['reference_latents']}"
                f"{', compiled' if r.get('compile') else ''})" for r in syncs) + ".", ""]
        ph = t.get("phases") or next(({"command": t["command"], **r} for r in t["runs"] if "phases_s" in r), None)
        if ph:
            parts = ", ".join(f"{k.replace('#', ' ')} {v} s" for k, v in ph["phases_s"].items())
            lines += [f"Where one micro-batch of {ph['micro_batch']} goes ({ph['samples_per_s']} samples/s in that run; "
                      "vae_encoder 1 = target, 2 = reference; unet 1 = caching pass, 2 = forward with the cache; rest "
                      f"= backward, optimizer and glue): {parts}. {commands(ph)}", ""]
    for case in ("generate", "generate_sdxl"):
        if case not in c or "base_s" not in c[case]:
            continue
        g = c[case]
        a, u = g["adapter_overhead"], g["unet_level"]
        pipeline = "DreamCacheXLPipeline" if g.get("base") == "sdxl" else "DreamCachePipeline"
        lines += [f"### Generation{', SDXL' if g.get('base') == 'sdxl' else ''}: {g['resolution']} px, {g['steps']} "
                  f"steps, joint guidance (goals: at most "
                  f"{GOALS['personalised_vs_base']}x the base model, adapter overhead at most "
                  f"{GOALS['adapter_overhead']}x per pass)", "",
                  *table(["what", "time", "ratio"],
                         [[f"base model, no personalisation (`{pipeline}` without a cache)", f"{g['base_s']} s", "1"],
                          ["DreamCache: caching pass + generation with the cache", f"{g['personalised_s']} s",
                           f"**{g['personalised_vs_base']}x**"],
                          ["caching pass alone", f"{g['caching_s']} s", f"{g['caching_s'] / g['base_s']:.3f}x"],
                          ["U-Net work: DreamCache against the reference every step",
                           f"{u['dreamcache_s']} s vs {u['reference_every_step_s']} s", f"**{u['ratio']}x**"],
                          [f"one U-Net pass with the cache against the base pass (batch 1, {a['latent']}x{a['latent']} latent)",
                           f"{a['cached_pass_s']} s vs {a['base_pass_s']} s", f"**{a['ratio']}x**"]]), "",
                  f"Fastest of {g['unet_level']['repeats']} interleaved repeats each; by medians the end-to-end ratio is "
                  f"{g['median_personalised_vs_base']}x and the per-pass overhead {a['median_ratio']}x "
                  f"({a['repeats']} repeats). {commands(g)}", ""]
        if g.get("compiled"):
            lines += ["With the U-Net compiled for sampling (`pipe.compile(mode)`, `dreamcache generate --compile`), "
                      "both pipelines alike:", "",
                      *table(["mode", "base model", "DreamCache, caching included", "ratio", "ratio by medians",
                              "first calls (compile)"],
                             [[m, f"{r['base_s']} s", f"{r['personalised_s']} s", f"**{r['personalised_vs_base']}x**",
                               f"{r['median_personalised_vs_base']}x", f"{r['warmup_s']} s"]
                              for m, r in g["compiled"].items()]), ""]
        if "profile" in g:
            pr = g["profile"]
            added = ", ".join(f"`{r['operator']}` x{r['count']} ({r['ms']} ms)" for r in pr["added"]) or "none"
            lines += [f"One step's U-Net call under torch.profiler ({pr['timed']}): the base model's two rows, "
                      f"{pr['base']['operators']} operators, {pr['base']['kernels']} kernels, {pr['base']['ms']} ms; "
                      f"with the cache on the text row, {pr['guided']['operators']} operators, "
                      f"{pr['guided']['kernels']} kernels, {pr['guided']['ms']} ms. What the cache adds, most time "
                      f"first: {added}.", ""]
    lines.append(END)
    return "\n".join(lines)


def write_markdown(report: dict, path: Path) -> None:
    from benchmarks.common import write_markdown as replace_section

    replace_section(report, path, markdown, BEGIN, END)


def versions() -> dict:
    import diffusers
    import transformers

    return {"cuda": torch.version.cuda, "transformers": transformers.__version__, "diffusers": diffusers.__version__}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks --gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu.json")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--device", default=default_device())
    p.add_argument("--tiny", action="store_true", help="the tiny models at tiny sizes (tests the code, not speed)")
    p.add_argument("--sdxl-modes", nargs="+", choices=SDXL_MODES, default=["eager", "compile"],
                   help="SDXL eager, torch.compile, compiled with CUDA graphs (reduce-overhead), FP8 (torchao, "
                        "compiled; always run last, its images compared with compile's); compiling takes minutes")
    p.add_argument("--generate-modes", nargs="+", choices=GENERATE_MODES, default=["eager"],
                   help="generation with the U-Net eager, then also compiled and/or compiled with CUDA graphs")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend for --generate-modes (aot_eager: tests the code on a CPU)")
    p.add_argument("--segment-modes", nargs="+", choices=["eager", "compile"], default=["eager"],
                   help="segmentation eager, and also with torch.compile (compiling takes minutes)")
    p.add_argument("--markdown", default="", help="also rewrite this file's GPU section (e.g. BENCHMARKS.md)")
    p.add_argument("--repeats", type=int, help="timed repeats where a case repeats (default 3; generation 7)")
    p.add_argument("--train-batches", type=int, nargs="+",
                   help="micro-batch sizes of the trainer case (default 8 16 32)")
    p.add_argument("--sdxl-batches", type=int, nargs="+",
                   help="batch sizes of the SDXL case (default 1 4 8; each compiles its own graphs)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU machine, or pass --tiny --device cpu to test the code",
              file=sys.stderr)
        return 2
    dtype, sizes = torch.bfloat16, TINY if args.tiny else FULL
    if args.repeats:
        sizes = replace(sizes, repeats=args.repeats, generate_repeats=args.repeats)
    if args.train_batches:
        sizes = replace(sizes, train_batches=tuple(args.train_batches))
    if args.sdxl_batches:
        sizes = replace(sizes, sdxl_batches=tuple(args.sdxl_batches))
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes per case: let cuDNN pick its fastest convolutions
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m benchmarks --gpu " + " ".join(argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "hardware": {**hardware(), **versions(), "device": torch.cuda.get_device_name() if args.device == "cuda"
                           else "cpu"},
              "tiny": args.tiny, "sizes": asdict(sizes), "peak": peak_flops(args.device), "cases": {}}
    cases = {"sdxl": lambda: case_sdxl(args.tiny, args.device, dtype, sizes, report["peak"], args.sdxl_modes),
             "segment": lambda: case_segment(args.tiny, args.device, dtype, sizes, args.segment_modes),
             "train": lambda: case_train(args.tiny, args.device, dtype, sizes, report["peak"]),
             "generate": lambda: case_generate(args.tiny, args.device, dtype, sizes, modes=args.generate_modes,
                                               backend=args.compile_backend),
             "generate_sdxl": lambda: case_generate(args.tiny, args.device, dtype, replace(
                 sizes, generate_repeats=min(3, sizes.generate_repeats)), base="sdxl")}
    failed = 0
    for name in args.cases:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            report["cases"][name] = cases[name]()
        except Exception:  # one case's failure must not cost the others' figures
            failed += 1
            report["cases"][name] = {"error": traceback.format_exc()}
        report["cases"][name]["case_s"] = round(time.perf_counter() - start, 1)
        report["cases"][name]["command"] = report["command"]
        print(f"[{name}] {json.dumps(report['cases'][name])[:3000]}", file=sys.stderr, flush=True)
        (out / "gpu.json").write_text(json.dumps(report, indent=1))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.markdown:
        write_markdown(report, Path(args.markdown))
    summary = {name: _headline(name, c) for name, c in report["cases"].items()}
    print(json.dumps(summary))
    return 1 if failed else 0


def _headline(name: str, c: dict):
    if "error" in c:
        return "error: " + c["error"].strip().splitlines()[-1][:300]
    return {"sdxl": lambda: c["best"], "segment": lambda: c["stage_samples_per_s"],
            "train": lambda: c["best"] and {k: c["best"][k] for k in ("micro_batch", "samples_per_s",
                                                                     "projected_gpu_hours_25k_x_128")},
            "generate": lambda: {"personalised_vs_base": c["personalised_vs_base"],
                                 "adapter_overhead": c["adapter_overhead"]["ratio"],
                                 "vs_reference_every_step": c["unet_level"]["ratio"]},
            "generate_sdxl": lambda: {"personalised_vs_base": c["personalised_vs_base"],
                                      "adapter_overhead": c["adapter_overhead"]["ratio"]}}[name]()


def markdown_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks --gpu-markdown")
    p.add_argument("report", help="a gpu.json written by python -m benchmarks --gpu")
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    write_markdown(json.loads(Path(args.report).read_text()), Path(args.markdown))
    return 0

