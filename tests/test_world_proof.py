"""The small world end to end, smaller than ``make proof``: the pipeline writes triplets with the committed
world base, the adapters train on them, and on held-out subjects, from class-only prompts, DreamCache draws
the subject's identity far more often than the base model does from the same prompts and seeds."""

import json

import pytest

from conftest import ROOT
from world import proof


@pytest.mark.slow
def test_dreamcache_draws_held_out_identities_that_the_class_prompt_alone_does_not(tmp_path):
    out = tmp_path / "proof"
    assert proof.main(["--base", str(ROOT / "world" / "base-model"), "--out", str(out), "--size", "320",
                       "--steps", "400", "--images-per-prompt", "1"]) == 0
    made = json.loads((out / "proof.json").read_text())
    results = made["results"]
    floor, dreamcache, ceiling = (results[row] for row in proof.ROWS)
    assert dreamcache["identity"] >= max(3 * floor["identity"], floor["identity"] + 0.2), results
    assert dreamcache["shape"] >= floor["shape"] - 0.2, results  # the class still drawn: the base not broken
    assert ceiling["identity"] > floor["identity"], results  # the base can draw them when told
    leaked = made["training_targets"]  # the target stage dropped them; the judge reads the JPEG again here
    assert leaked["read_as_held_out"] <= 0.01 * leaked["targets"], leaked
