"""``dreamcache app``: a Gradio web app over ``dreamcache.studio``.

    dreamcache app --adapters runs/sd15 --dreambooth datasets/dreambooth          # http://127.0.0.1:7860
    dreamcache app --profile tiny --adapters demo/run/adapters.safetensors        # offline, tiny random models

Upload photos of a subject (or pick a DreamBooth subject), name it, and see the cut-outs the segmenter made:
they are cached once, and every prompt after reuses the cache. Images come beside the base model's for the same
seeds, with attention maps on request, and download as a zip (or the cache, for ``dreamcache generate``). The
models load once per process; requests wait in Gradio's queue and run one at a time. The same two calls are the
app's API (``gradio_client``): ``/personalize`` and ``/generate``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine unless asked

import gradio as gr  # noqa: E402

from dreamcache.commands import AppConfig, Sampling  # noqa: E402
from dreamcache.errors import PipelineError  # noqa: E402
from dreamcache.images import open_image  # noqa: E402
from dreamcache.sampling import GUIDANCE, PRESETS  # noqa: E402
from dreamcache.studio import Studio, archive, write_cache  # noqa: E402

MAX_REFERENCES = 8  # photos per subject: each adds its tokens to every adapter call
QUEUE = 32  # requests waiting at most; more are turned away with a message
KEEP_FILES_S = 3600  # the files a request offers (zip, cache) are deleted one to two hours later
PRESET_LABELS = {"joint": "paper: joint guidance, scale 7.5", "official": "official code: combined, 7.5 and 0.4"}
EXAMPLE_PROMPTS = 4  # a DreamBooth subject fills in its first prompts
# Fonts of the machine: the default theme would fetch its fonts from Google, which an offline cluster cannot reach.
THEME = dict(primary_hue="indigo", font=["ui-sans-serif", "system-ui", "sans-serif"],
             font_mono=["ui-monospace", "monospace"])


class UserError(gr.Error):
    """A request the user can fix, shown in the page."""


def load(cfg: AppConfig) -> Studio:
    """The pipeline with the adapters, and the segmenter: once per process."""
    from dreamcache.segmenter import grounding_config, make_segmenter
    from dreamcache.studio import open_pipeline

    return Studio(open_pipeline(cfg, cfg.adapters), make_segmenter(grounding_config(cfg.profile, cfg.segmenter)))


def build(studio: Studio, cfg: AppConfig) -> gr.Blocks:
    """The page, over ``studio`` (loaded already)."""
    bench = None
    if cfg.dreambooth:
        from dreamcache.evaluate import load_benchmark

        bench = load_benchmark(cfg.dreambooth)
    files = Files()
    meta = studio.pipe.adapters_metadata

    def references(paths) -> tuple[list, list[str]]:
        paths = [p if isinstance(p, str) else p.name for p in (paths or [])]
        if not paths:
            raise UserError("add one or more photos of the subject first")
        if len(paths) > MAX_REFERENCES:
            raise UserError(f"{len(paths)} photos: at most {MAX_REFERENCES} per subject (each adds its tokens to "
                            "every adapter call)")
        try:
            return [open_image(p) for p in paths], [Path(p).name for p in paths]
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None

    def personalize(paths, subject, segment):
        images, names = references(paths)
        started, before = time.monotonic(), studio.cached
        try:
            made = studio.personalize(images, subject, segment, names=names)
        except (ValueError, PipelineError) as e:
            raise UserError(str(e)) from None
        how = "made" if studio.cached > before else "reused"
        covered = [f"{c:.0%}" for c in made.coverage if c is not None]
        note = f"; the masks cover {', '.join(covered)} of the photos" if covered else ""
        status = (f"Cache {how} for **{made.name or 'the subject'}** from {len(images)} reference(s) in "
                  f"{time.monotonic() - started:.1f} s{note}. Every prompt reuses it.")
        cutouts = [(im, name) for im, name in zip(made.cutouts, names)]
        return made, cutouts, str(write_cache(made, files.folder(made.key))), status

    def on_personalize(paths, subject, segment):
        _, cutouts, cache, status = personalize(paths, subject, segment)
        return cutouts, cache, status

    def on_generate(paths, subject, segment, prompts, n, seed, guidance, text_scale, image_scale, steps, base_too,
                    attention, progress=gr.Progress()):
        lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        if not lines:
            raise UserError("write a prompt (one per line)")
        try:
            settings = Sampling(n=int(n), seed=int(seed or 0), steps=int(steps), guidance=guidance,
                                text_scale=float(text_scale), image_scale=float(image_scale))
        except (TypeError, ValueError) as e:
            raise UserError(str(e)) from None
        if len(lines) * settings.n > cfg.max_images:
            raise UserError(f"{len(lines)} prompts x {settings.n} images is more than the {cfg.max_images} one "
                            "request may ask for (dreamcache app --max-images)")
        files.prune(KEEP_FILES_S)
        progress(0, desc="caching the references")
        made, cutouts, cache, _ = personalize(paths, subject, segment)
        started = time.monotonic()
        try:
            results = studio.generate(made, lines, settings, base_too=base_too, attention=attention,
                                      progress=lambda done, what: progress(done, desc=what))
        except (ValueError, PipelineError) as e:
            raise UserError(str(e)) from None
        took = time.monotonic() - started
        count = sum(len(r.images) + len(r.base) for r in results)
        zipped = files.folder() / "dreamcache-images.zip"
        zipped.write_bytes(archive(results))
        status = (f"{count} images in {took:.1f} s ({count / max(took, 1e-9) * 60:.1f} images/min), "
                  f"{seeds(settings)}; the cache of "
                  f"**{made.name or 'the subject'}** was made once and reused.")
        return ([(im, f"{r.prompt} · seed {s}") for r in results for im, s in zip(r.images, r.seeds)],
                [(im, f"{r.prompt} · seed {s}") for r in results for im, s in zip(r.base, r.seeds)],
                gr.update(value=[(sheet, caption) for r in results for caption, sheet in r.attention],
                          visible=bool(attention)),
                cutouts, cache, str(zipped), status)

    def on_preset(preset):
        values = PRESETS[preset]
        return values["guidance"], values["text_scale"], values["image_scale"]

    with gr.Blocks(title="DreamCache", delete_cache=(KEEP_FILES_S, KEEP_FILES_S)) as demo:
        gr.Markdown(f"## DreamCache\nPersonalised generation from a cache of the reference's features: "
                    f"base **{Path(studio.pipe.base_name).name}**, adapters `{meta.get('adapters', '')}` "
                    f"({meta.get('fusion', 'concat')}, step {meta.get('step', '?')}, sha256 "
                    f"{meta.get('adapters_sha256', '')[:12]}), on {studio.pipe.device}.")
        with gr.Row():
            with gr.Column(scale=2):
                if bench is not None:
                    pick = gr.Dropdown([s.name for s in bench.subjects], value=None, label="DreamBooth subject")
                photos = gr.File(file_count="multiple", file_types=["image"], label="Reference photos of the subject",
                                 elem_id="references")
                subject = gr.Textbox(label="Subject", placeholder="dog", elem_id="subject",
                                     info="what to cut out (Grounding DINO's phrase)")
                segment = gr.Checkbox(True, label="Cut the subject out of the photos")
                personalize_button = gr.Button("Personalize", elem_id="personalize")
                cutouts = gr.Gallery(label="What is cached (the cut-outs)", columns=4, height=180, format="png",
                                     object_fit="contain", fit_columns=False, elem_id="cutouts")
                cache_file = gr.File(label="Feature cache (for dreamcache generate --cache)", interactive=False)
            with gr.Column(scale=3):
                prompts = gr.Textbox(lines=3, label="Prompts, one per line", placeholder="a dog in the snow",
                                     elem_id="prompts")
                with gr.Row():
                    n = gr.Slider(1, 8, value=1, step=1, label="Images per prompt")
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                    steps = gr.Slider(1, 100, value=cfg.steps, step=1, label="Sampling steps")
                with gr.Accordion("Guidance", open=False):
                    preset = gr.Dropdown([(PRESET_LABELS[k], k) for k in PRESETS], value="joint", label="Preset")
                    guidance = gr.Radio(list(GUIDANCE), value=PRESETS["joint"]["guidance"], label="Guidance")
                    text_scale = gr.Slider(1, 15, value=PRESETS["joint"]["text_scale"], step=0.1,
                                           label="Text scale (joint, or s_T)")
                    image_scale = gr.Slider(0.1, 10, value=PRESETS["joint"]["image_scale"], step=0.1,
                                            label="Image scale s_I (combined)")
                with gr.Row():
                    base_too = gr.Checkbox(True, label="The base model beside, same seeds")
                    attention = gr.Checkbox(False, label="Attention maps")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    images = gr.Gallery(label="DreamCache", columns=3, format="png", object_fit="contain",
                                        elem_id="images")
                    base = gr.Gallery(label="Base model", columns=3, format="png", object_fit="contain", elem_id="base")
                maps = gr.Gallery(label="Attention maps per adapter layer: each reference, then the image", columns=3,
                                  format="png", object_fit="contain", visible=False, elem_id="maps")
                download = gr.File(label="Images (zip)", interactive=False)
        inputs = [photos, subject, segment]
        gpu = dict(concurrency_id="gpu", concurrency_limit=1)  # both calls share the models: one request at a time
        personalize_button.click(on_personalize, inputs, [cutouts, cache_file, status], api_name="personalize", **gpu)
        generate_button.click(on_generate, [*inputs, prompts, n, seed, guidance, text_scale, image_scale, steps,
                                            base_too, attention],
                              [images, base, maps, cutouts, cache_file, download, status], api_name="generate", **gpu)
        preset.change(on_preset, preset, [guidance, text_scale, image_scale], api_name=False, queue=False)
        if bench is not None:
            def on_pick(name):
                chosen = next(s for s in bench.subjects if s.name == name)
                return ([str(chosen.images[0])], chosen.noun,
                        "\n".join(bench.prompts(chosen)[:EXAMPLE_PROMPTS]))
            pick.change(on_pick, pick, [photos, subject, prompts], api_name=False, queue=False)
    demo.queue(max_size=QUEUE)
    return demo


def seeds(settings: Sampling) -> str:
    last = settings.seed + settings.n - 1
    return f"seed {last}" if settings.n == 1 else f"seeds {settings.seed}-{last}"


class Files:
    """Folders for the files the page offers (a zip per request, a cache per subject), removed when the process
    ends."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="dreamcache-app-"))
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)

    def folder(self, name: str | None = None) -> Path:
        """A new folder, or the one named ``name`` (a subject's: its cache is written once)."""
        path = self.root / (name or uuid.uuid4().hex[:12])
        path.mkdir(exist_ok=name is not None)
        return path

    def prune(self, age_s: float) -> None:
        """Deletes the folders older than ``age_s`` (Gradio serves its own copies of the files it was handed)."""
        now = time.time()
        for path in self.root.iterdir():
            if now - path.stat().st_mtime > age_s:
                shutil.rmtree(path, ignore_errors=True)


def serve(cfg: AppConfig, studio: Studio | None = None, block: bool = True) -> tuple[gr.Blocks, str]:
    """Loads the models (unless ``studio`` is given), builds the page and serves it on ``cfg.host:cfg.port``;
    returns (the app, its URL) at once when ``block`` is False (``demo.close()`` stops it)."""
    studio = studio or load(cfg)
    demo = build(studio, cfg)
    try:
        _, url, _ = demo.launch(server_name=cfg.host, server_port=cfg.port or free_port(cfg.host),
                                prevent_thread_lock=True, show_error=True, quiet=True,
                                allowed_paths=dreambooth_images(cfg.dreambooth), max_file_size="20mb",
                                theme=gr.themes.Soft(**THEME), footer_links=["api"])
    except OSError as e:  # the port is taken, the address is not this machine's
        raise ValueError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}): pick another --port, or "
                         "--port 0 for any free one") from None
    if block:
        print(f"DreamCache app on {url} (Ctrl+C stops it)", flush=True)
        demo.block_thread()  # until Ctrl+C, then closes the server
    return demo, url


def dreambooth_images(folder: str | None) -> list[str] | None:
    """The DreamBooth photos the page may show (the subjects' images, not the whole folder)."""
    if not folder:
        return None
    from dreamcache.evaluate import load_benchmark

    return [str(p) for s in load_benchmark(folder).subjects for p in s.images]


def free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
