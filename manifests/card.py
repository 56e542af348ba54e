"""The dataset card: README.md in a dataset's folder, from its dataset.json alone, as the Hugging Face Hub reads
it (YAML front matter with the ``webdataset`` shards as the train split, the size, tags) and a reader wants it
(the members of a sample, counts, the drop funnel, the models and their licences, how to load it).

The pipeline writes it with dataset.json at the end of every run; ``python -m manifests card URI`` writes it
again for a dataset made before. A README.md the toolkit did not write is the user's and is left alone.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from dreamcache.cards import written_here
from dreamcache.store import Store
from manifests.schema import SHARDS, read_index
from manifests.show import funnel, human_bytes

CARD = "README.md"
# The licences of the models the paper profile uses (their model cards); other models: "see its model card".
LICENCES = {"stabilityai/stable-diffusion-xl-base-1.0": "CreativeML Open RAIL++-M",
            "meta-llama/Llama-3.2-3B-Instruct": "Llama 3.2 Community License",
            "IDEA-Research/grounding-dino-base": "Apache-2.0", "facebook/sam-vit-huge": "Apache-2.0",
            "openai/clip-vit-large-patch14": "MIT"}
ROLES = {"captions": "captions (LLM)", "targets": "targets (text-to-image)", "detector": "detection",
         "segmenter": "segmentation", "clip": "caption-target agreement"}


def licence(model: str) -> str:
    if model in LICENCES:
        return LICENCES[model]
    return "none: random weights (tiny profile)" if model.startswith("tiny:") else "see its model card"


def features(index: dict[str, Any]) -> list[dict[str, str]]:
    """The members of a sample as ``datasets``' webdataset builder names its columns."""
    reference = "reference." + index.get("config", {}).get("segment", {}).get("reference_format", "jpg")
    return [{"name": "__key__", "dtype": "string"}, {"name": "txt", "dtype": "string"},
            {"name": "json", "dtype": "json (the sample's record)"}, {"name": "target.jpg", "dtype": "image"},
            {"name": reference, "dtype": "image"}, {"name": "mask.png", "dtype": "image"}]


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def dataset_card(index: dict[str, Any], uri: str) -> str:
    """The card of the dataset at ``uri`` whose dataset.json is ``index``."""
    totals, models = index["totals"], index.get("models", {})
    front = {"pretty_name": f"DreamCache triplets ({totals['samples']:,})", "task_categories": ["text-to-image"],
             "tags": ["dreamcache", "webdataset", "synthetic", "subject-driven-generation"],
             "size_categories": [size_category(totals["samples"])],
             "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"{SHARDS}/*.tar"}]}],
             "dreamcache": {"fingerprint": index.get("fingerprint"), "complete": index.get("complete"),
                            "samples": totals["samples"], "shards": totals["shards"]}}
    steps = funnel(index)
    first = steps[0][1] or 1
    shards = json.dumps(f"{uri.rstrip('/')}/{SHARDS}/*.tar")
    load = f'load_dataset("webdataset", data_files={{"train": {shards}}}, split="train")'
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# DreamCache triplets: {totals['samples']:,} samples", "",
             "Synthetic (caption, target, reference, mask) triplets for training DreamCache adapters: an LLM writes "
             "the captions, a text-to-image model draws each target, a detector and a segmenter cut the subject out "
             "onto white as the reference.", "",
             f"{'Complete' if index.get('complete') else 'Not complete'}: {totals['samples']:,} samples in "
             f"{totals['shards']:,} shards ({human_bytes(totals['bytes'])}), fingerprint `{index.get('fingerprint')}`, "
             f"last written {index.get('updated', '?')}.", "",
             "## Load", "", "```python", "from datasets import load_dataset", "", f"ds = {load}",
             'sample = ds[0]  # sample["txt"], sample["json"], sample["target.jpg"] (a PIL image), ...', "```", "",
             "Uploaded to the Hub as a dataset repo, `load_dataset(\"ORG/NAME\")` reads the same shards (the front "
             "matter names them).", "",
             "The trainer reads the folder itself: `torchrun training/train.py --data " + uri + "`; "
             "`python -m manifests show " + uri + "` summarises it and `verify` checks it.", "",
             "## Each sample", "", "| member | type |", "|---|---|",
             *(f"| `{f['name']}` | {f['dtype']} |" for f in features(index)), "",
             "## How it was made", "", "| step | kept | of the first |", "|---|---:|---:|",
             *(f"| {step} | {n:,} | {100 * n / first:.1f}% |" for step, n in steps), "",
             "| role | model | revision | licence |", "|---|---|---|---|",
             *(f"| {ROLES.get(role, role)} | `{m.get('model')}` | {m.get('revision') or 'default'} | "
               f"{licence(str(m.get('model')))} |" for role, m in models.items()), "",
             "The images were made by the models above; their licences' use restrictions pass on to this data.", ""]
    return "\n".join(lines)


def write_card(store: Store, index: dict[str, Any] | None = None) -> str | None:
    """Writes ``store``'s README.md from its dataset.json; returns its URL (None: a README.md of the user's own
    is there, and stays)."""
    index = index or read_index(store)
    if index is None:
        raise FileNotFoundError(f"{store.uri} has no dataset.json: is it a dataset folder?")
    if store.exists(CARD) and not written_here(store.read_bytes(CARD).decode("utf-8", "replace")):
        return None
    store.write_atomic(dataset_card(index, store.url()).encode(), CARD)
    return store.url(CARD)
