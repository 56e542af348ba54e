"""Caption prompt template and the subject/context vocabularies, as data.

``vocabulary.yaml`` holds the categories (nouns and attributes), colours, contexts and styles;
``caption_request.txt`` is the instruction sent to the LLM. Both are plain files so that they can be
edited and versioned without touching code; their sha256 goes into the dataset index.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

HERE = Path(__file__).parent
VOCABULARY = HERE / "vocabulary.yaml"
CAPTION_REQUEST = HERE / "caption_request.txt"


@dataclass(frozen=True)
class Category:
    name: str
    nouns: tuple[str, ...]
    attributes: tuple[str, ...]


@dataclass(frozen=True)
class Vocabulary:
    categories: tuple[Category, ...]
    colours: tuple[str, ...]
    contexts: tuple[str, ...]
    styles: tuple[str, ...]

    def category(self, name: str) -> Category:
        for c in self.categories:
            if c.name == name:
                return c
        raise KeyError(f"unknown category {name!r}; known: {', '.join(c.name for c in self.categories)}")

    def all_text(self) -> list[str]:
        """Every phrase in the vocabulary (for building tiny tokenizers)."""
        out = list(self.colours) + list(self.contexts) + list(self.styles)
        for c in self.categories:
            out += [c.name, *c.nouns, *c.attributes]
        return out


@lru_cache(maxsize=4)
def load_vocabulary(path: str | Path = VOCABULARY) -> Vocabulary:
    raw = yaml.safe_load(Path(path).read_text())
    cats = tuple(
        Category(name, tuple(v["nouns"]), tuple(v.get("attributes", ()))) for name, v in raw["categories"].items()
    )
    vocab = Vocabulary(cats, tuple(raw.get("colours") or ()), tuple(raw["contexts"]), tuple(raw.get("styles") or ()))
    for field in ("categories", "contexts"):  # styles and colours may be empty
        if len(getattr(vocab, field)) == 0:
            raise ValueError(f"{path}: '{field}' is empty")
    return vocab


@lru_cache(maxsize=4)
def caption_request_template(path: str | Path = CAPTION_REQUEST) -> str:
    return Path(path).read_text()


def fingerprint(vocabulary: str | Path = VOCABULARY) -> str:
    """sha256 over the vocabulary and the request template: which prompts made a dataset."""
    h = hashlib.sha256()
    for p in (Path(vocabulary), CAPTION_REQUEST):
        h.update(p.read_bytes())
    return h.hexdigest()
