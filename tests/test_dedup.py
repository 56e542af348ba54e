from collections import Counter

import numpy as np

from pipeline.config import DedupConfig
from pipeline.dedup import dedup_and_balance, lsh_bands, minhash_signatures


def rows(captions, category="dog"):
    return [{"caption": c, "subject": c.split(" on ")[0], "category": category} for c in captions]


def test_exact_duplicates_after_normalisation():
    plan, drops = dedup_and_balance(rows(["A dog on the beach.", "a dog on the  beach", "a dog on a mountain"]), 10,
                                    DedupConfig())
    assert [r["caption"] for r in plan] == ["A dog on the beach.", "a dog on a mountain"]
    assert drops["dedup:exact"] == 1


def test_near_duplicates_are_removed_and_distinct_captions_kept():
    base = "a fluffy corgi sitting on a wooden dock at dawn beside a calm lake with mist over the water"
    near = base.replace("at dawn", "at sunrise")  # one word of 18 changed
    far = "a red ceramic teapot on a marble countertop next to a bowl of lemons in soft morning light"
    plan, drops = dedup_and_balance(rows([base, near, far]), 10, DedupConfig(minhash_threshold=0.6))
    assert [r["caption"] for r in plan] == [base, far]
    assert drops["dedup:near_duplicate"] == 1


def test_minhash_estimates_jaccard():
    a = " ".join(f"w{i}" for i in range(60))
    b = " ".join(f"w{i}" for i in range(30)) + " " + " ".join(f"x{i}" for i in range(30))
    sig = minhash_signatures([a, a, b], num_perm=256)
    assert (sig[0] == sig[1]).all()
    # word 3-grams: 58 each, 28 shared -> Jaccard 28/88
    assert abs(np.mean(sig[0] == sig[2]) - 28 / 88) < 0.08


def test_lsh_band_midpoint_is_near_threshold():
    b, r = lsh_bands(64, 0.8)
    assert b * r <= 64 and abs((1 / b) ** (1 / r) - 0.8) < 0.05


def test_semantic_dedup_uses_minilm():
    captions = ["a small dog running on the beach", "a little puppy runs along the seashore",
                "an antique brass clock on a bookshelf"]
    plan, drops = dedup_and_balance(rows(captions), 10, DedupConfig(semantic=True, semantic_threshold=0.6))
    assert [r["caption"] for r in plan] == [captions[0], captions[2]]
    assert drops["dedup:semantic"] == 1


def test_category_cap_and_round_robin_keep_every_prefix_balanced():
    data = rows([f"dog number {i} on a sofa" for i in range(300)], "dog") + \
        rows([f"cat number {i} on a mat" for i in range(40)], "cat") + \
        rows([f"vase number {i} on a shelf" for i in range(40)], "vase")
    plan, drops = dedup_and_balance(data, 90, DedupConfig(minhash_threshold=1.0, category_slack=1.5))
    assert len(plan) == 90
    first = Counter(r["category"] for r in plan[:30])
    assert first == {"cat": 10, "dog": 10, "vase": 10}
    assert drops["dedup:category_cap"] == 300 - 45  # cap = ceil(1.5 * 90 / 3)
    assert sum(drops.values()) + len(plan) == len(data)


def test_subject_cap():
    data = [{"caption": f"a red kite over a field number {i}", "subject": "red kite", "category": "toy"} for i in range(5)]
    plan, drops = dedup_and_balance(data, 10, DedupConfig(minhash_threshold=1.0, subject_cap=2))
    assert len(plan) == 2 and drops["dedup:subject_cap"] == 3
