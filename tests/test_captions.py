import importlib.util
from collections import Counter

import numpy as np
import pytest

from pipeline.captions import CaptionStage, TransformersBackend, make_requests, parse_answer, subject_in_caption
from pipeline.config import CaptionConfig
from pipeline.stage import Drop

GOOD = '{"subject": "a ceramic teapot", "caption": "a ceramic teapot on a wooden kitchen counter in soft light"}'

# Realistic ways an LLM answer goes wrong, with the drop reasons each must produce.
MALFORMED = {
    "empty": ("", ["empty"]),
    "whitespace": ("  \n\t \n", ["empty"]),
    "none": (None, ["empty"]),
    "prose": ("Sure! Here are some captions for you. I hope they help with your dataset.", ["prose"]),
    "truncated": ('{"subject": "a red kite", "caption": "a red kite flying over a gre', ["truncated_json"]),
    "truncated_after_good": (GOOD + '\n{"subject": "a bl', [None, "truncated_json"]),
    "missing_subject": ('{"caption": "a blue bicycle leaning on a stone wall at dusk"}', ["missing_subject"]),
    "empty_subject": ('{"subject": "  ", "caption": "a blue bicycle leaning on a stone wall at dusk"}', ["missing_subject"]),
    "missing_caption": ('{"subject": "a blue bicycle"}', ["missing_caption"]),
    "subject_not_in_caption": ('{"subject": "a green lamp", "caption": "a brass desk lamp glowing on a cluttered desk at night"}',
                               ["subject_not_in_caption"]),
    "wrong_types": ('{"subject": ["dog"], "caption": 42}', ["missing_caption"]),
    "not_an_object": ('["a dog", "a cat"]', ["not_an_object", "not_an_object"]),
    "short_caption": ('{"subject": "a dog", "caption": "a dog"}', ["caption_length"]),
    "huge_line": ('{"subject": "a dog", "caption": "a dog ' + "very " * 5000 + 'happy"}', ["too_long"]),
    "huge_answer": ("\n".join([GOOD] * 500), [None] * 8 + ["too_many"] * 492),
    "invalid_json": ("{subject: 'a dog', caption: 'a dog in the park on a sunny day'}", ["invalid_json"]),
    "long_subject": ('{"subject": "a very big old red and blue striped wooden toy train", '
                     '"caption": "a very big old red and blue striped wooden toy train on a rug"}', ["subject_too_long"]),
    "binary_garbage": ("\x00\x01\x02{\x7f\ufffd", ["truncated_json"]),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_answers_become_counted_drops(name):
    text, expected = MALFORMED[name]
    results = parse_answer(text, limit=8)
    got = [r.reason if isinstance(r, Drop) else None for r in results]
    assert got == expected


def test_good_answers_in_every_shape():
    lines = [GOOD, '{"subject": "The Brass Lamp.", "caption": "the brass lamp glowing on a cluttered desk at night"}']
    shapes = {
        "jsonl": "\n".join(lines),
        "fenced": "```json\n" + "\n".join(lines) + "\n```",
        "numbered": "\n".join(f"{i + 1}. {l}" for i, l in enumerate(lines)),
        "array": "[" + ",\n".join(lines) + "]",
        "preamble": "Here you go:\n" + "\n".join(lines),
    }
    for name, text in shapes.items():
        ok = [r for r in parse_answer(text, limit=8) if not isinstance(r, Drop)]
        assert [r["subject"] for r in ok] == ["ceramic teapot", "brass lamp"], name
        assert ok[0]["caption"].startswith("a ceramic teapot")


def test_subject_match_is_whole_words():
    assert subject_in_caption("a cat", "a cat on a mat")
    assert not subject_in_caption("a cat", "a catalogue on a table")
    assert subject_in_caption("The Teapot", "a teapot, steaming")


def test_requests_cover_categories_evenly_and_are_deterministic():
    cfg = CaptionConfig(backend="template")
    a, b = make_requests(480, 3, 0, cfg), make_requests(480, 3, 0, cfg)
    assert a == b
    counts = Counter(r["category"] for r in a)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert make_requests(10, 3, 1, cfg) != make_requests(10, 3, 0, cfg)  # each round asks anew


def _batch(requests):
    return {k: np.array([r[k] for r in requests], dtype=object) for k in requests[0]}


def test_template_stage_yields_valid_captions():
    cfg = CaptionConfig(backend="template", captions_per_request=5)
    out = CaptionStage(cfg)(_batch(make_requests(20, 0, 0, cfg)))
    assert len(out["caption"]) == 100 and set(out["status"]) == {"ok"}
    for s, c in zip(out["subject"], out["caption"]):
        assert subject_in_caption(s, c)


class _Scripted:
    """A backend that answers from a script (and fails on one request) to exercise the stage around it."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, requests):
        out = []
        for r in requests:
            a = self.answers[r["request_id"]]
            if isinstance(a, Exception):
                raise a
            out.append(a)
        return out


def test_stage_counts_every_malformed_answer_and_survives_backend_errors():
    cfg = CaptionConfig(backend="template")
    requests = make_requests(len(MALFORMED) + 1, 0, 0, cfg)
    answers = {r["request_id"]: MALFORMED[name][0] for r, name in zip(requests, sorted(MALFORMED))}
    answers[requests[-1]["request_id"]] = RuntimeError("CUDA out of memory")
    stage = CaptionStage(cfg)
    stage.backend = _Scripted(answers)
    out = stage(_batch(requests))
    counts = Counter(out["status"])
    expected = Counter(f"captions:{r}" if r else "ok" for _, reasons in MALFORMED.values() for r in reasons)
    expected["captions:error"] += 1
    assert counts == expected


def test_transformers_backend_runs_a_real_causal_lm(tiny_dir):
    """The tiny Llama writes noise; the stage must load it through from_pretrained and never crash."""
    cfg = CaptionConfig(backend="transformers", model="tiny:llama", max_new_tokens=24, captions_per_request=2)
    stage = CaptionStage(cfg)
    assert isinstance(stage.backend, TransformersBackend)
    out = stage(_batch(make_requests(3, 0, 0, cfg)))
    assert len(out["status"]) >= 3
    assert all(s == "ok" or s.startswith("captions:") for s in out["status"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed (GPU extra: pip install '.[vllm]'); no official CPU build")
def test_vllm_backend_generates(tiny_dir):
    cfg = CaptionConfig(backend="vllm", model="tiny:llama", max_new_tokens=24, captions_per_request=2, dtype="float32",
                        gpu_memory_utilization=0.25, max_model_len=1024)
    out = CaptionStage(cfg)(_batch(make_requests(4, 0, 0, cfg)))
    assert len(out["status"]) >= 4
    assert all(s == "ok" or s.startswith("captions:") for s in out["status"])
    again = CaptionStage(cfg)(_batch(make_requests(4, 0, 0, cfg)))
    assert list(again["error"]) == list(out["error"])  # per-request seeds: reproducible
