"""Rows back in plan order from batches that arrive in any order, held outside the driver's memory."""

import random

import numpy as np
import pytest

from pipeline.reorder import Reorder


def batch(indices):
    return {"index": np.asarray(indices), "key": np.asarray([f"k{i}" for i in indices], dtype=object)}


class Objects:
    """A stand-in object store that counts what it holds."""

    def __init__(self):
        self.objects, self.gets = {}, 0

    def put(self, value):
        ref = len(self.objects)
        self.objects[ref] = value
        return ref

    def get(self, ref):
        self.gets += 1
        return self.objects[ref]


@pytest.mark.parametrize("seed", range(5))
def test_any_arrival_order_gives_plan_order(seed):
    rng = random.Random(seed)
    blocks = [list(range(i, min(i + 8, 203))) for i in range(3, 203, 8)]
    rng.shuffle(blocks)
    for b in blocks:
        rng.shuffle(b)  # rows within a batch in any order too
    store = Objects()
    r = Reorder(3, store.put, store.get)
    out = [row["index"] for b in blocks for row in r.push(batch(b))]
    assert out == list(range(3, 203)) and r.held == 0 and r.next == 203
    assert [row["key"] for row in Reorder(3, store.put, store.get).push(batch(list(range(3, 6))))] == ["k3", "k4", "k5"]


def test_a_late_block_holds_only_the_writer_and_is_reported():
    now = [0.0]
    store = Objects()
    r = Reorder(0, store.put, store.get, clock=lambda: now[0])
    assert [row["index"] for row in r.push(batch([0, 1]))] == [0, 1]
    for start in range(4, 40, 4):  # candidates 2-3 are late; everything after them keeps arriving
        now[0] += 10
        assert list(r.push(batch(range(start, start + 4)))) == []
    assert r.held == 36 and len(store.objects) == 9  # one held object per batch, not one per row
    assert r.waiting() == (90.0, 36) and r.missing() == "2-3"
    out = [row["index"] for row in r.push(batch([3, 2]))]
    assert out == list(range(2, 40)) and r.waiting() is None and r.most_held == 36
    assert store.gets == 9  # each held batch fetched once


def test_a_row_twice_is_an_error_not_a_duplicate_sample():
    r = Reorder(0, Objects().put, Objects().get)
    list(r.push(batch([0, 1])))
    with pytest.raises(RuntimeError, match="twice"):
        list(r.push(batch([1, 2])))
    r = Reorder(0, (s := Objects()).put, s.get)
    list(r.push(batch([5])))
    with pytest.raises(RuntimeError, match="twice"):
        list(r.push(batch([5])))
    assert r.missing() == "0-4"
