"""python -m manifests {show,verify,sheet,stats,card} URI: inspect what the pipeline wrote (local path or fsspec URL)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from manifests.schema import DamagedManifest
from dreamcache.store import Store, StoreError, write_file_atomic
from dreamcache.usage import Parser, fail, positive

PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m manifests", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="summary: totals, drop funnel, categories, models, config")
    show.add_argument("uri")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--top", type=positive, default=10, help="categories to list")
    verify = sub.add_parser("verify", help="check shards against manifests and dataset.json; exit 1 on any problem")
    verify.add_argument("uri")
    verify.add_argument("--checksums", action="store_true", help="also read every tar: sha256 and member list")
    verify.add_argument("--deep", action="store_true", help="also decode every member (implies --checksums)")
    verify.add_argument("--allow-incomplete", action="store_true",
                        help="a dataset short of its size (running, interrupted) is not a problem")
    sheet = sub.add_parser("sheet", help="contact sheet of triplets as one self-contained HTML file")
    sheet.add_argument("uri")
    sheet.add_argument("--n", type=positive, default=24, help="triplets to show")
    sheet.add_argument("--seed", type=int, default=0, help="which triplets: the same seed draws the same ones")
    sheet.add_argument("--category", action="append", help="only these categories (repeatable)")
    sheet.add_argument("--out", default="sheet.html")
    stats = sub.add_parser("stats", help="plots: categories, mask area, scores, funnel")
    stats.add_argument("uri")
    stats.add_argument("--out", default="stats.png", help=f"the figure: {', '.join(PLOT_FORMATS)}")
    card = sub.add_parser("card", help="write the dataset card (URI/README.md) from dataset.json again")
    card.add_argument("uri")
    args = p.parse_args(argv)
    if args.command == "stats" and Path(args.out).suffix.lower() not in PLOT_FORMATS:
        return fail(f"stats --out {args.out}: the figure is written as an image; end the name with one of "
                    f"{', '.join(PLOT_FORMATS)}")
    try:
        store = Store(args.uri)
        if not store.fs.exists(store.root):
            raise FileNotFoundError(f"{args.uri}: no such dataset folder")
        return COMMANDS[args.command](store, args)
    except (FileNotFoundError, StoreError, DamagedManifest) as e:
        return fail(e)
    except json.JSONDecodeError as e:
        return fail(f"{args.uri}: a file of the dataset is not valid JSON ({e}); "
                    f"python -m manifests verify {args.uri} names it")


def _card(store: Store, args: argparse.Namespace) -> int:
    from manifests.card import write_card

    written = write_card(store)
    if written is None:
        return fail(f"{store.url('README.md')} is not a dataset card this toolkit wrote: left as it is (move it "
                    "aside to have the card written)")
    print(f"wrote {written}")
    return 0


def _show(store: Store, args: argparse.Namespace) -> int:
    from manifests.show import render, summary

    s = summary(store)
    print(json.dumps(s, indent=1) if args.json else render(s, args.top))
    return 0


def _verify(store: Store, args: argparse.Namespace) -> int:
    from manifests.verify import verify

    problems, checked = verify(store, checksums=args.checksums or args.deep, deep=args.deep,
                               allow_incomplete=args.allow_incomplete)
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

    write_file_atomic(args.out, build(store, args.n, args.seed, args.category).encode())
    print(f"wrote {args.out}")
    return 0


def _stats(store: Store, args: argparse.Namespace) -> int:
    from manifests.stats import plot

    counts = plot(store, args.out)
    print(f"wrote {args.out} ({counts['samples']:,} samples, {counts['shards']} shards)")
    return 0


COMMANDS = {"show": _show, "verify": _verify, "sheet": _sheet, "stats": _stats, "card": _card}

if __name__ == "__main__":
    sys.exit(main())
