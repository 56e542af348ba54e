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
                       "--steps", "160", "--images-per-prompt", "1"]) == 0
    results = json.loads((out / "proof.json").read_text())["results"]
    floor, dreamcache, ceiling = (results[row] for row in proof.ROWS)
    assert dreamcache["identity"] >= floor["identity"] + 0.25, results
    assert dreamcache["context"] >= floor["context"] - 0.15, results
    assert ceiling["identity"] > floor["identity"], results  # the base can draw them when told
