"""What made a folder of evaluation images: recorded beside them, compared when a rerun would add to them.

``dreamcache evaluate`` keeps its generated images so that a rerun continues where an interrupted one stopped.
An image on disk is only worth keeping if this run would make the same one, so each images folder holds a
``provenance.json`` (written before its first image) with everything that changes the pixels: the adapters'
hash, the base and its dtype, the sampler, steps, guidance and scales, the seed, images per prompt, the
references and their hashes, the segmenter that cut them out, the caching recipe and the prompts. A rerun whose
setup differs is refused, naming each difference, unless it is told to make the images again (``--regenerate``).
The prompts are compared as a prefix: asking for more of them (``--prompts``) adds to a folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from dreamcache.store import write_file_atomic

FILE = "provenance.json"
FORMAT = "dreamcache-eval-images/1"
# Recorded, not compared: the format, and where the adapters were read (their hash says what they are).
IGNORED = ("format", "adapters")


def read(folder: Path) -> dict[str, Any] | None:
    path = folder / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write(folder: Path, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_file_atomic(folder / FILE, json.dumps(record, indent=1).encode())


def has_images(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.png"))


def digest(record: dict[str, Any]) -> str:
    """A short hash of a setup without its prompts (what a subject's feature cache is checked against)."""
    fixed = {k: v for k, v in record.items() if k not in (*IGNORED, "prompts")}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each way ``current`` differs from ``recorded``, as "field recorded -> current" (nested fields dotted:
    ``references.0.sha256``); the prompts only where both have one."""
    out = []
    for key in dict.fromkeys([*recorded, *current]):
        if key in IGNORED:
            continue
        if key == "prompts":
            pairs = zip(recorded.get(key) or [], current.get(key) or [])
            out += [f"prompt {j} {_show(a)} -> {_show(b)}" for j, (a, b) in enumerate(pairs) if a != b][:1]
            continue
        out += [f"{name} {_show(a)} -> {_show(b)}" for name, a, b in _leaves(key, recorded.get(key), current.get(key))]
    return out


def _leaves(name: str, a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    if a == b:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in dict.fromkeys([*a, *b]) for d in _leaves(f"{name}.{k}", a.get(k), b.get(k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _leaves(f"{name}.{i}", x, y)]
    return [(name, a, b)]


def _show(value: Any) -> str:
    return json.dumps(value)


def stale(folder: Path, current: dict[str, Any]) -> list[str]:
    """Why the images in ``folder`` are not what ``current`` would make; [] when the folder can take this run's
    images (it has none yet, or the same setup made them)."""
    if not has_images(folder):
        return []
    recorded = read(folder)
    if recorded is None:
        return [f"no {FILE} (images written before evaluation recorded its setup)"]
    return differences(recorded, current)


def merged(folder: Path, current: dict[str, Any]) -> dict[str, Any]:
    """The record for ``folder`` once this run's images join those of the same setup: the longer prompt list."""
    recorded = read(folder) if has_images(folder) else None
    if recorded is not None and len(recorded.get("prompts", [])) > len(current["prompts"]):
        return {**current, "prompts": recorded["prompts"]}
    return current


def refusal(stale_folders: dict[Path, list[str]]) -> str:
    """The one-line error for a rerun whose setup differs from what made the images already there."""
    folder, reasons = next(iter(stale_folders.items()))
    more = len(stale_folders) - 1
    return (f"{folder} holds images made with another setup ({'; '.join(reasons)})"
            + (f", and so do {more} more folder(s)" if more else "")
            + ": run again with --regenerate to delete and make them again, or write to another --out")


def clear(folder: Path) -> int:
    """Deletes ``folder`` (its images and their record); returns how many images it held."""
    images = len(list(folder.glob("*.png")))
    shutil.rmtree(folder)
    return images
