"""Model cards: the README.md beside ``adapters.safetensors`` (a training run's --out, ``python -m training.export``),
with YAML front matter as the Hugging Face Hub reads it (``base_model``, ``library_name``, ``tags``) and the
adapters' recipe under ``dreamcache:``: what personalisation must repeat, what they were trained on, how they
scored. Everything comes from the adapter file's own metadata, the run's records and ``dreamcache evaluate``'s
results.json; nothing is typed by hand."""

from __future__ import annotations

import json
from typing import Any

import yaml

METRICS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "mdino": "masked DINO", "mclip_i": "masked CLIP-I"}


def model_card(meta: dict[str, str], training: dict[str, Any] | None = None,
               evaluation: dict[str, Any] | None = None, name: str = "adapters", sha256: str | None = None) -> str:
    """The card of the adapters whose file metadata is ``meta`` (``generation.adapter_metadata``). ``training``:
    what the run records (data, dataset identity, steps, batch, learning rate); ``evaluation``: ``dreamcache
    evaluate``'s results.json; ``sha256``: the file's (``generation.file_sha256``), which evaluations name too.
    ``name``: how the usage lines name the adapters (a folder or a repo id)."""
    base = meta.get("base_checkpoint") or meta.get("base", "")
    recipe = {"format": meta.get("format"), "fusion": meta.get("fusion"), "layers": json.loads(meta.get("layers", "[]")),
              "resolution": _int(meta.get("resolution")), "cache_timestep": _int(meta.get("cache_timestep")),
              "cache_prompt": meta.get("cache_prompt", ""), "references": _int(meta.get("references")),
              "step": _int(meta.get("step")), "config_sha256": meta.get("config_sha256"), "adapters_sha256": sha256}
    front: dict[str, Any] = {"library_name": "dreamcache", "pipeline_tag": "text-to-image",
                             "tags": ["dreamcache", "personalization", "subject-driven-generation", "adapters",
                                      "diffusers", *(["stable-diffusion-xl"] if meta.get("base_family") == "sdxl"
                                                     else ["stable-diffusion"])],
                             "dreamcache": {k: v for k, v in recipe.items() if v is not None}}
    if is_hub_id(base):  # the Hub links the card to its base model (a local folder or a tiny model it could not)
        front = {**front, "base_model": base, "base_model_relation": "adapter"}
    if training:
        front["dreamcache"]["training"] = training
    scores = (evaluation or {}).get("overall")
    if scores:
        front["dreamcache"]["evaluation"] = {"protocol": "DreamBooth (dreamcache evaluate)",
                                             **{k: round(v, 4) for k, v in scores.items() if isinstance(v, float)},
                                             "images": scores.get("images")}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# DreamCache adapters for {base}", "",
             "Personalised generation by feature caching (DreamCache, CVPR 2025): a reference image goes once through "
             "the frozen U-Net, its features are cached, and these adapters inject them into every generation; no "
             "fine-tuning per subject.", "",
             "## Use", "", "```bash",
             f"dreamcache personalize --adapters {name} --reference dog.jpg --subject dog --out dog.cache",
             'dreamcache generate --cache dog.cache --prompt "a dog in the snow" --out dog.png', "```", "", "```python",
             "from dreamcache.generation import load_pipeline", "",
             f'pipe = load_pipeline("{meta.get("base", base)}", "{name}")',
             'cache = pipe.cache_reference(image, subject="dog")  # a PIL image of the subject on white',
             'image = pipe("a dog in the snow", cache=cache).images[0]', "```", "",
             "## Recipe", "", "| | |", "|---|---|",
             *(f"| {k.replace('_', ' ')} | {_show(v)} |" for k, v in recipe.items() if v is not None), ""]
    if training:
        lines += ["## Training", "", "| | |", "|---|---|", *(f"| {k.replace('_', ' ')} | {_show(v)} |"
                                                          for k, v in training.items()), ""]
    if scores:
        lines += ["## Evaluation (DreamBooth protocol)", "", "| metric | value |", "|---|---:|",
                  *(f"| {label} | {scores[k]:.4f} |" for k, label in METRICS.items()
                    if isinstance(scores.get(k), float)), f"| images | {scores.get('images')} |", ""]
    return "\n".join(lines)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub model id ("org/name"), not a local path or a tiny model."""
    from pathlib import Path

    return name.count("/") == 1 and ":" not in name and not name.startswith((".", "/", "~")) and not Path(name).exists()


def written_here(text: str) -> bool:
    """Whether a README.md is a card this toolkit wrote (its front matter has a ``dreamcache`` section): one it
    may replace, unlike a user's own."""
    try:
        return "dreamcache" in read_front_matter(text)
    except yaml.YAMLError:
        return False


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (``---`` ... ``---`` at its top); {} when there is none."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    front = yaml.safe_load(text[4:end]) if end > 0 else None
    return front if isinstance(front, dict) else {}


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value) + "`"
    return "empty (the paper's)" if value == "" else str(value)
