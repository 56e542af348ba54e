"""``python -m manifests verify``: does the dataset on disk match what its manifests and index promise?

Three depths, each including the one before:

- default: manifests and one directory listing per folder (fast at 400 shards): every manifest parses,
  shards are contiguous and their plan slices chain, each committed tar exists with the recorded size,
  no tar lacks a manifest, no key appears twice, per-manifest counts agree, dataset.json totals and shard
  list equal the sums over the manifests;
- ``--checksums``: also reads every tar: sha256 and the member list (five members per sample, as listed);
- ``--deep``: also decodes every member (images open, json parses, the mask is single-channel).

Every problem is one line naming the shard (or dataset.json); the exit status is 0 only when there are none.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass

from manifests.lock import lock_state
from manifests.schema import MANIFESTS, SHARDS, Manifest, read_index, shard_index, shard_name, tar_members
from dreamcache.store import Store


@dataclass(frozen=True)
class Problem:
    where: str  # shard name, manifest name or dataset.json
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def verify(store: Store, checksums: bool = False, deep: bool = False,
           allow_incomplete: bool = False) -> tuple[list[Problem], dict[str, int]]:
    """(problems, counts of what was checked). A dataset that has not reached its size is a problem unless
    ``allow_incomplete`` (a run still writing, or one to be resumed)."""
    problems: list[Problem] = []
    tars = {n: s for n, s in store.sizes(SHARDS).items() if n.endswith(".tar")}
    manifests: list[Manifest] = []
    for name in sorted(n for n in store.sizes(MANIFESTS) if n.endswith(".json")):
        try:
            manifests.append(Manifest.from_json(store.read_bytes(MANIFESTS, name)))
        except (ValueError, KeyError, TypeError) as e:
            problems.append(Problem(name, f"manifest does not parse: {e}"))
    manifests.sort(key=lambda m: shard_index(m.shard))

    seen: dict[str, str] = {}
    for i, m in enumerate(manifests):
        problems += _check_manifest(m, i, manifests[i - 1] if i else None, tars)
        for s in m.samples:
            if s.key in seen:
                problems.append(Problem(m.shard, f"duplicate key {s.key} (also in {seen[s.key]})"))
            else:
                seen[s.key] = m.shard
        if (checksums or deep) and m.shard in tars:
            problems += _check_tar(store, m, deep)
    committed = {m.shard for m in manifests}
    problems += [Problem(n, "tar without a manifest (uncommitted, or its manifest was deleted)")
                 for n in sorted(set(tars) - committed)]
    problems += _check_index(store, manifests, allow_incomplete)
    checked = {"shards": len(manifests), "samples": sum(m.count for m in manifests),
               "bytes": sum(m.bytes for m in manifests)}
    return problems, checked


def _check_manifest(m: Manifest, i: int, prev: Manifest | None, tars: dict[str, int]) -> list[Problem]:
    out = []
    if m.shard != shard_name(i):
        out.append(Problem(m.shard, f"shards are not contiguous: expected {shard_name(i)} at position {i}"))
    if m.count != len(m.samples):
        out.append(Problem(m.shard, f"manifest count {m.count} but {len(m.samples)} sample records"))
    if prev is not None and m.candidates[0] != prev.candidates[1]:
        out.append(Problem(m.shard, f"plan slice {list(m.candidates)} does not follow {prev.shard}'s {list(prev.candidates)}"))
    if m.shard not in tars:
        out.append(Problem(m.shard, "missing: the manifest exists but the tar does not"))
    elif tars[m.shard] != m.bytes:
        out.append(Problem(m.shard, f"size {tars[m.shard]} bytes, manifest says {m.bytes}"))
    return out


def _check_tar(store: Store, m: Manifest, deep: bool) -> list[Problem]:
    data = store.read_bytes(SHARDS, m.shard)
    sha = hashlib.sha256(data).hexdigest()
    if sha != m.sha256:
        return [Problem(m.shard, f"sha256 {sha[:12]}... does not match the manifest's {m.sha256[:12]}...")]
    expected = {f"{s.key}.{member}" for s in m.samples for member in s.members}
    out = []
    try:
        members = tar_members(data, with_data=deep)
    except tarfile.TarError as e:
        return [Problem(m.shard, f"not a readable tar: {e}")]
    found = {f"{k}.{s}" for k, v in members.items() for s in v}
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        out.append(Problem(m.shard, f"members differ from the manifest: missing {missing[:3]}, unexpected {extra[:3]}"))
    if deep:
        for key, group in members.items():
            for suffix, blob in group.items():
                error = decode_error(suffix, blob)
                if error:
                    out.append(Problem(m.shard, f"{key}.{suffix} does not decode: {error}"))
    return out


def decode_error(suffix: str, blob: bytes) -> str | None:
    """None if a member decodes as its suffix says, else why not."""
    from PIL import Image

    try:
        if suffix == "json":
            json.loads(blob)
        elif suffix == "txt":
            if not blob.decode("utf-8").strip():
                return "empty caption"
        else:
            with Image.open(io.BytesIO(blob)) as im:
                im.load()
                if suffix == "mask.png" and im.mode != "L":
                    return f"mask mode {im.mode}, expected L"
    except Exception as e:  # any decoder failure is a finding, not a crash
        return f"{type(e).__name__}: {e}"
    return None


def _check_index(store: Store, manifests: list[Manifest], allow_incomplete: bool) -> list[Problem]:
    try:
        index = read_index(store)
    except json.JSONDecodeError as e:
        return [Problem("dataset.json", f"does not parse: {e}")]
    if index is None:
        return [Problem("dataset.json", "missing")]
    out = []
    if not index.get("complete") and not allow_incomplete:
        now = lock_state(store)
        why = (f"a run is writing it now ({now.describe()})" if now.state == "live" else
               "interrupted: run the same pipeline command to resume" if index.get("status") == "running" else
               index.get("status"))
        out.append(Problem("dataset.json", f"incomplete: {index.get('totals', {}).get('samples')} of "
                                           f"{index.get('size')} triplets; {why} (--allow-incomplete to accept)"))
    totals = index.get("totals", {})
    sums = {"samples": sum(m.count for m in manifests), "shards": len(manifests), "bytes": sum(m.bytes for m in manifests)}
    for k, v in sums.items():
        if totals.get(k) != v:
            out.append(Problem("dataset.json", f"totals.{k} is {totals.get(k)}, the manifests sum to {v}"))
    listed = [s["name"] for s in index.get("shards", [])]
    if listed != [m.shard for m in manifests]:
        only_index = sorted(set(listed) - {m.shard for m in manifests})
        only_manifests = sorted({m.shard for m in manifests} - set(listed))
        out.append(Problem("dataset.json", f"shard list differs from the manifests: only in the index {only_index}, "
                                           f"only as manifests {only_manifests}"))
    return out
