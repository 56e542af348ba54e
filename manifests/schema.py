"""The dataset layout and the manifest schema: the single definition that writers and readers share.

The format is documented for users in docs/dataset-format.md; keep the two in step.

    OUT/
      shards/shard-000000.tar      webdataset tars: KEY.txt KEY.json KEY.target.jpg KEY.reference.(jpg|png) KEY.mask.png
      manifests/shard-000000.json  one per shard, written after its tar: the commit marker
      plan/chunk-000000.jsonl      the frozen caption plan in chunks (candidates in the order they are consumed)
      plan/chunk-000000.json       a chunk's commit marker; plan/plan.json the whole plan's (pipeline/plan.py)
      dataset.json                 the index, rebuilt from the manifests after every commit
      owner.json, lock.json        the folder's owner and the live run's lock (manifests/lock.py)
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from dreamcache.store import Store

FORMAT = "dreamcache-shard/1"
SHARDS, MANIFESTS, PLAN = "shards", "manifests", "plan"
MEMBERS = ("txt", "json", "target.jpg", "reference.{fmt}", "mask.png")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def manifest_name(index: int) -> str:
    return f"shard-{index:06d}.json"


def shard_index(name: str) -> int:
    """'shard-000042.tar' or 'shard-000042.json' -> 42."""
    return int(name.split("-", 1)[1].split(".", 1)[0])


@dataclass
class SampleRecord:
    """One sample of a shard, as its manifest lists it (the tar's KEY.json holds the same and more).

    ``record`` holds the sample stages' scores (segmentation: det_score, sam_score, mask_area; the CLIP filter:
    clip_score); in the manifest they sit beside the other fields, as they always have."""

    key: str
    index: int  # position in the caption plan
    caption: str
    subject: str
    category: str
    seed: int
    members: dict[str, int]  # member name (txt, json, ...) -> bytes
    record: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        record = d.pop("record")
        return {**d, **record}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleRecord":
        core = {f: d[f] for f in CORE}
        return cls(**core, record={k: v for k, v in d.items() if k not in CORE})


CORE = ("key", "index", "caption", "subject", "category", "seed", "members")  # SampleRecord's own fields


@dataclass
class DropRecord:
    """A plan candidate that this shard consumed but did not keep."""

    key: str
    index: int
    stage: str
    reason: str
    detail: str = ""


@dataclass
class Manifest:
    shard: str  # tar name under shards/
    sha256: str
    bytes: int
    count: int
    candidates: tuple[int, int]  # [start, end) of the plan consumed by this shard
    samples: list[SampleRecord]
    drops: list[DropRecord] = field(default_factory=list)
    created: str = ""
    format: str = FORMAT
    # The id of the run that committed it (lock.json's "run", its fencing token: the run checked that the lock
    # still named it before writing the tar and this manifest); None in manifests from before it was recorded.
    run: str | None = None

    def to_json(self) -> bytes:
        d = asdict(self)
        d["candidates"] = list(self.candidates)
        d["samples"] = [s.to_dict() for s in self.samples]
        if d["run"] is None:  # a manifest from before the run id was recorded writes back as it was
            del d["run"]
        return json.dumps(d, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "Manifest":
        d = json.loads(data)
        if d.get("format") != FORMAT:
            raise ValueError(f"unknown manifest format {d.get('format')!r} (expected {FORMAT})")
        d["candidates"] = tuple(d["candidates"])
        d["samples"] = [SampleRecord.from_dict(s) for s in d["samples"]]
        d["drops"] = [DropRecord(**x) for x in d.get("drops", [])]
        return cls(**d)


class DamagedManifest(ValueError):
    """A committed manifest that does not parse: the dataset was changed after it was written."""


def read_manifests(store: Store) -> list[Manifest]:
    """Every committed shard's manifest, in shard order; a damaged one is a DamagedManifest naming it."""
    out = []
    for name in store.list(MANIFESTS, ".json"):
        if name.startswith("."):
            continue
        try:
            out.append(Manifest.from_json(store.read_bytes(MANIFESTS, name)))
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedManifest(f"{store.uri}: manifests/{name} does not parse ({type(e).__name__}: {e}); it was "
                                  f"damaged after it was committed. Check with: python -m manifests verify "
                                  f"{store.uri}") from None
    return out


def read_index(store: Store) -> dict[str, Any] | None:
    return json.loads(store.read_bytes("dataset.json")) if store.exists("dataset.json") else None


def tar_members(data: bytes, keys: set[str] | None = None, with_data: bool = True) -> dict[str, dict[str, bytes]]:
    """{key: {suffix: bytes}} of a shard's bytes ("KEY.target.jpg" -> key KEY, suffix target.jpg); only
    ``keys`` if given; member contents only ``with_data`` (else b"")."""
    out: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            key, _, suffix = info.name.partition(".")
            if keys is None or key in keys:
                out[key][suffix] = tar.extractfile(info).read() if with_data else b""
    return dict(out)
