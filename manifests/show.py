"""``python -m manifests show``: what a dataset holds, from dataset.json alone (fast at any size)."""

from __future__ import annotations

from typing import Any

from manifests.lock import LockState, lock_state
from manifests.schema import read_index
from dreamcache.store import Store


# Drop reasons that are not losses, shown with what they mean.
LABELS = {"dedup:surplus": "unused (plan already full)"}


def reason_label(stage: str, reason: str) -> str:
    return LABELS.get(f"{stage}:{reason}", reason)


# The sample stages of datasets written before dataset.json listed them.
STAGES = [{"name": "targets", "funnel": "SDXL targets"}, {"name": "segment", "funnel": "segmented triplets"}]


def funnel(index: dict[str, Any]) -> list[tuple[str, int]]:
    """The path from captions asked of the LLM to triplets: [(step, count)], each step after its stage's drops.
    The sample stages' steps follow the stages the run had (dataset.json's ``stages``)."""
    plan, drops, totals = index.get("plan", {}), index.get("drops", {}), index["totals"]
    captions = plan.get("captions", 0)
    lines = captions + sum(drops.get("captions", {}).values())
    left = totals["candidates_consumed"]
    steps = [("captions asked of the LLM", lines), ("valid captions", captions),
             ("caption plan (unique, balanced)", plan.get("candidates", 0)), ("candidates consumed", left)]
    for stage in index.get("stages") or STAGES:
        left -= sum(drops.get(stage["name"], {}).values())
        steps.append((stage["funnel"], left))
    return steps


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def state(index: dict[str, Any], lock: LockState) -> str:
    """complete | running | interrupted | stopped: the index says what the last run wrote, the lock whether a
    run is alive now."""
    if lock.state == "live":
        return "running"
    if index["complete"]:
        return "complete"
    return "interrupted" if index["status"] == "running" else "stopped"


def summary(store: Store) -> dict[str, Any]:
    index = read_index(store)
    lock = lock_state(store)
    if index is None:
        doing = f"a run is writing it ({lock.describe()}) but" if lock.state == "live" else "not a dataset, or"
        raise FileNotFoundError(f"{store.uri}: no dataset.json ({doing} its first shard is not committed yet)")
    return {
        "uri": store.uri,
        "state": state(index, lock),
        "lock": {**lock.info, "state": lock.state, "heartbeat_age_s": round(lock.age_s, 1)} if lock.info else None,
        "complete": index["complete"],
        "status": index["status"],
        "size": index["size"],
        "created": index.get("created"),
        "updated": index.get("updated"),
        "totals": index["totals"],
        "funnel": funnel(index),
        "drops": index["drops"],
        "categories": index["categories"],
        "models": index.get("models", {}),
        "versions": index.get("versions", {}),
        "config": index.get("config", {}),
        "fingerprint": index.get("fingerprint"),
    }


STATES = {
    "complete": lambda s: "complete",
    "running": lambda s: f"running: pid {s['lock']['pid']} on {s['lock']['host']}, last heartbeat "
                         f"{s['lock']['heartbeat_age_s']:.0f} s ago",
    "interrupted": lambda s: "INTERRUPTED: no run is writing it; run the same pipeline command to resume",
    "stopped": lambda s: "INCOMPLETE: " + s["status"],
}


def render(s: dict[str, Any], top: int = 10) -> str:
    t = s["totals"]
    lines = [
        f"{s['uri']}",
        f"  {t['samples']:,} / {s['size']:,} triplets in {t['shards']} shards, {human_bytes(t['bytes'])}"
        f"  ({STATES[s['state']](s)})",
        f"  created {s['created']}, updated {s['updated']}, config fingerprint {s['fingerprint']}",
        "",
        "funnel",
    ]
    first = s["funnel"][0][1] or 1
    lines += [f"  {step:<34}{n:>10,}  {100 * n / first:5.1f}%" for step, n in s["funnel"]]
    lines += ["", "drops"]
    for stage, reasons in s["drops"].items():
        lines.append(f"  {stage:<10}" + ", ".join(f"{reason_label(stage, r)} {n:,}"
                                                  for r, n in sorted(reasons.items(), key=lambda x: -x[1])))
    cats = list(s["categories"].items())
    lines += ["", f"categories ({len(cats)}, top {min(top, len(cats))})"]
    lines += [f"  {c:<24}{n:>8,}  {100 * n / max(t['samples'], 1):5.1f}%" for c, n in cats[:top]]
    lines += ["", "models"]
    for stage, m in s["models"].items():
        extra = f" ({m['backend']})" if m.get("backend") else ""
        lines.append(f"  {stage:<10}{m.get('model')}{extra}{' @ ' + m['revision'] if m.get('revision') else ''}")
    cfg = s["config"]
    if cfg:
        tg = cfg.get("targets", {})
        lines += ["", "config", f"  profile {cfg.get('profile')}, seed {cfg.get('seed')}, shard size "
                  f"{cfg.get('shards', {}).get('shard_size')}, SDXL {tg.get('resolution')} px, {tg.get('steps')} steps, "
                  f"guidance {tg.get('guidance_scale')}"]
    lines += ["", "versions", "  " + ", ".join(f"{k} {v}" for k, v in s["versions"].items())]
    return "\n".join(lines)
