"""Exports a training run's adapters as a folder to share: ``adapters.safetensors`` and its model card.

    python -m training.export runs/sd15 export/sd15
    python -m training.export s3://bucket/runs/sd15 export/sd15 --checkpoint step-00020000 \
        --evaluation eval/sd15 --name my-org/dreamcache-sd15
    hf upload my-org/dreamcache-sd15 export/sd15      # then: --adapters my-org/dreamcache-sd15

The card (README.md, YAML front matter as the Hugging Face Hub reads it) holds the base, layers, fusion, caching
timestep and prompt, the training data's identity and fingerprint, the steps and, with ``--evaluation``, the
DreamBooth scores of ``dreamcache evaluate`` (refused when they were measured on other adapters).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from dreamcache.errors import PipelineError
from dreamcache.hub import ADAPTERS_FILE, CARD_FILE
from dreamcache.store import Store, write_file_atomic
from dreamcache.usage import Parser, fail
from training.checkpoints import CHECKPOINTS, complete_checkpoints, read_run, training_facts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m training.export", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the training run's --out (a folder or an object store URL)")
    p.add_argument("out", help="the folder to write (adapters.safetensors and README.md)")
    p.add_argument("--checkpoint", help="which checkpoint (step-NNNNNNNN; default: the newest complete one)")
    p.add_argument("--evaluation", help="a `dreamcache evaluate --out` folder (or its results.json) measured on these "
                                        "adapters: its scores go into the card")
    p.add_argument("--name", help="how the card's usage lines name the adapters, e.g. the Hub repo id (default: OUT)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    return p.parse_args(argv)


def export(run: str, out: str, checkpoint: str | None = None, evaluation: str | None = None,
           name: str | None = None, overwrite: bool = False) -> Path:
    """Writes OUT/adapters.safetensors and OUT/README.md from checkpoint ``checkpoint`` of ``run``; returns OUT."""
    from dreamcache.cards import model_card
    from dreamcache.generation import adapter_metadata

    store = Store(run)
    done = complete_checkpoints(store)
    if not done:
        raise PipelineError(f"{run} holds no complete checkpoint ({store.url(CHECKPOINTS)}/step-*/COMPLETE)")
    checkpoint = checkpoint or done[-1]
    if checkpoint not in done:
        raise PipelineError(f"--checkpoint {checkpoint}: not a complete checkpoint of {run}; there are "
                            f"{', '.join(done[-5:])}")
    target = Path(out)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not overwrite)):
        raise PipelineError(f"{out} exists and is not an empty folder: export to a new folder, or --overwrite "
                            "an earlier export")
    if overwrite and target.is_dir() and set(p.name for p in target.iterdir()) - {ADAPTERS_FILE, CARD_FILE}:
        raise PipelineError(f"--overwrite: {out} holds more than an export ({ADAPTERS_FILE}, {CARD_FILE}); "
                            "choose another folder")
    adapters = store.read_bytes(CHECKPOINTS, checkpoint, ADAPTERS_FILE)
    config, run_record = read_run(store, checkpoint)
    sha256 = hashlib.sha256(adapters).hexdigest()[:16]  # as generation.file_sha256 and provenance name a file
    scores = read_evaluation(evaluation, sha256) if evaluation else None
    with tempfile.TemporaryDirectory(prefix="dreamcache-export-") as tmp:  # every check before OUT changes
        staged = Path(tmp) / ADAPTERS_FILE
        staged.write_bytes(adapters)
        card = model_card(adapter_metadata(staged), training_facts(config, run_record), scores, name=name or out,
                          sha256=sha256)
    target.mkdir(parents=True, exist_ok=True)
    write_file_atomic(target / ADAPTERS_FILE, adapters)
    write_file_atomic(target / CARD_FILE, card.encode())
    return target


def read_evaluation(path: str, adapters_sha256: str) -> dict:
    """``dreamcache evaluate``'s results.json (a folder or the file), if it was measured on the adapters whose
    sha256 (its first 16 hex digits, as ``generation.file_sha256`` and provenance record it) is ``adapters_sha256``."""
    file = Path(path) / "results.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise PipelineError(f"--evaluation {path}: no results.json (written by dreamcache evaluate --out)")
    results = json.loads(file.read_text())
    measured = {record.get("adapters_sha256") for record in results.get("provenance", {}).values()}
    if measured != {adapters_sha256}:
        raise PipelineError(f"--evaluation {path} scored other adapters (sha256 {', '.join(sorted(map(str, measured)))}, "
                            f"these are {adapters_sha256}): evaluate this checkpoint's adapters, or leave it out")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = export(args.run, args.out, args.checkpoint, args.evaluation, args.name, args.overwrite)
    except (PipelineError, FileNotFoundError, ValueError) as e:
        return fail(e)
    print(f"wrote {out / ADAPTERS_FILE} and {out / CARD_FILE}; load them with --adapters {args.name or out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
