"""python -m manifests {show,verify,sheet,stats} URI: inspect what the pipeline wrote (local path or fsspec URL)."""

from __future__ import annotations

import argparse
import json
import sys

from manifests.store import Store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m manifests", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="summary: totals, drop funnel, categories, models, config")
    show.add_argument("uri")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--top", type=int, default=10, help="categories to list")
    verify = sub.add_parser("verify", help="check shards against manifests and dataset.json; exit 1 on any problem")
    verify.add_argument("uri")
    verify.add_argument("--checksums", action="store_true", help="also read every tar: sha256 and member list")
    verify.add_argument("--deep", action="store_true", help="also decode every member (implies --checksums)")
    sheet = sub.add_parser("sheet", help="contact sheet of triplets as one self-contained HTML file")
    sheet.add_argument("uri")
    sheet.add_argument("--n", type=int, default=24, help="triplets to show")
    sheet.add_argument("--seed", type=int, default=0, help="which triplets: the same seed draws the same ones")
    sheet.add_argument("--category", action="append", help="only these categories (repeatable)")
    sheet.add_argument("--out", default="sheet.html")
    stats = sub.add_parser("stats", help="plots: categories, mask area, scores, funnel")
    stats.add_argument("uri")
    stats.add_argument("--out", default="stats.png")
    args = p.parse_args(argv)
    store = Store(args.uri)
    try:
        return COMMANDS[args.command](store, args)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _show(store: Store, args: argparse.Namespace) -> int:
    from manifests.show import render, summary

    s = summary(store)
    print(json.dumps(s, indent=1) if args.json else render(s, args.top))
    return 0


def _verify(store: Store, args: argparse.Namespace) -> int:
    from manifests.verify import verify

    problems, checked = verify(store, checksums=args.checksums or args.deep, deep=args.deep)
    for problem in problems:
        print(problem)
    depth = "deep" if args.deep else "checksums" if args.checksums else "manifests"
    summary = f"{checked['samples']:,} samples in {checked['shards']} shards ({checked['bytes'] / 1e6:.1f} MB), {depth}"
    if problems:
        print(f"FAILED: {len(problems)} problem(s); {summary}", file=sys.stderr)
        return 1
    print(f"OK: {summary}")
    return 0


def _sheet(store: Store, args: argparse.Namespace) -> int:
    from manifests.sheet import build

    with open(args.out, "w", encoding="utf-8") as f:
        f.write(build(store, args.n, args.seed, args.category))
    print(f"wrote {args.out}")
    return 0


def _stats(store: Store, args: argparse.Namespace) -> int:
    from manifests.stats import plot

    counts = plot(store, args.out)
    print(f"wrote {args.out} ({counts['samples']:,} samples, {counts['shards']} shards)")
    return 0


COMMANDS = {"show": _show, "verify": _verify, "sheet": _sheet, "stats": _stats}

if __name__ == "__main__":
    sys.exit(main())
