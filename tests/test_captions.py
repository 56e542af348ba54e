import importlib.util
import json
import re
from collections import Counter

import numpy as np
import pytest

from pipeline.captions import CaptionStage, TransformersBackend, make_requests, parse_answer, subject_in_caption
from pipeline.config import CaptionConfig
from pipeline.stage import Drop

GOOD = '{"subject": "a ceramic teapot", "caption": "a ceramic teapot on a wooden kitchen counter in soft light"}'
GOOD2 = '{"subject": "a brass lamp", "caption": "a brass lamp glowing on a cluttered desk at night"}'

# Realistic ways an LLM answer goes wrong, and the drop reasons each must produce: (answer, captions asked, reasons
# with None for a kept caption). Every caption asked for is accounted for.
MALFORMED = {
    "empty": ("", 2, ["empty", "empty"]),
    "whitespace": ("  \n\t \n", 2, ["empty", "empty"]),
    "none": (None, 2, ["empty", "empty"]),
    "prose": ("Sure! Here are some captions for you. I hope they help with your dataset.", 2, ["prose", "prose"]),
    "truncated": ('{"subject": "a red kite", "caption": "a red kite flying over a gre', 2, ["truncated_json", "too_few"]),
    "truncated_after_good": (GOOD + '\n{"subject": "a bl', 2, [None, "truncated_json"]),
    "truncated_array": ("[" + GOOD + ', {"subject": "a red kite", "caption": "a red ki', 2, [None, "truncated_json"]),
    "too_few": (GOOD, 3, [None, "too_few", "too_few"]),
    "missing_subject": ('{"caption": "a blue bicycle leaning on a stone wall at dusk"}', 1, ["missing_subject"]),
    "empty_subject": ('{"subject": "  ", "caption": "a blue bicycle leaning on a stone wall at dusk"}', 1,
                      ["missing_subject"]),
    "missing_caption": ('{"subject": "a blue bicycle"}', 1, ["missing_caption"]),
    "subject_not_in_caption": ('{"subject": "a green lamp", "caption": "a brass desk lamp glowing on a cluttered desk"}',
                               1, ["subject_not_in_caption"]),
    "wrong_types": ('{"subject": ["dog"], "caption": 42}', 1, ["missing_caption"]),
    "not_an_object": ('["a dog", "a cat"]', 2, ["not_an_object", "not_an_object"]),
    "short_caption": ('{"subject": "a dog", "caption": "a dog"}', 1, ["caption_length"]),
    "huge_caption": ('{"subject": "a dog", "caption": "a dog ' + "very " * 5000 + 'happy"}', 1, ["too_long"]),
    "huge_answer": ("\n".join([GOOD] * 500), 8, [None] * 8 + ["too_many"] * 492),
    "invalid_json": ("{subject: 'a dog', caption: 'a dog in the park on a sunny day'}", 2, ["invalid_json", "too_few"]),
    "two_invalid_lines": ("{subject: 'a dog'}\n{subject: 'a cat'}\n" + GOOD, 3, [None, "invalid_json", "invalid_json"]),
    "long_subject": ('{"subject": "a very big old red and blue striped wooden toy train", '
                     '"caption": "a very big old red and blue striped wooden toy train on a rug"}', 1,
                     ["subject_too_long"]),
    "binary_garbage": ("\x00\x01\x02{\x7f\ufffd", 2, ["truncated_json", "too_few"]),
}

# Valid answers in the shapes models write: every one must give both captions.
SHAPES = {
    "jsonl": GOOD + "\n" + GOOD2,
    "fenced_lines": "```json\n" + GOOD + "\n" + GOOD2 + "\n```",
    "numbered": f"1. {GOOD}\n2. {GOOD2}",
    "array": "[" + GOOD + ",\n" + GOOD2 + "]",
    "one_line_array_in_fence": "```json\n[" + GOOD + ", " + GOOD2 + "]\n```",
    "array_after_introduction": "Sure, here are two captions:\n[" + GOOD + ", " + GOOD2 + "]",
    "two_objects_on_a_line": "Sure: " + GOOD + " " + GOOD2,
    "indented_array": "Here you go.\n" + json.dumps([json.loads(GOOD), json.loads(GOOD2)], indent=2),
    "capitalised_keys": GOOD.replace('"subject"', '"Subject"').replace('"caption"', '"Caption"') + "\n" +
                        GOOD2.replace('"subject"', '"SUBJECT"').replace('"caption"', '" Caption "'),
    "wrapped": json.dumps({"captions": [json.loads(GOOD), json.loads(GOOD2)]}),
    "compact_schema_output": json.dumps([json.loads(GOOD), json.loads(GOOD2)], separators=(",", ":")),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_answers_become_counted_drops(name):
    text, n, expected = MALFORMED[name]
    results = parse_answer(text, n)
    got = [r.reason if isinstance(r, Drop) else None for r in results]
    assert got == expected


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_good_answers_in_every_shape(name):
    results = parse_answer(SHAPES[name], 2)
    assert not [r for r in results if isinstance(r, Drop)], results
    assert [r["subject"] for r in results] == ["ceramic teapot", "brass lamp"]
    assert results[0]["caption"].startswith("a ceramic teapot")


def test_every_caption_asked_for_is_accounted_for():
    """kept + dropped = what was asked, or every object found when there were more: nothing vanishes."""
    for name, (text, n, _) in {**MALFORMED, **{k: (v, 2, None) for k, v in SHAPES.items()}}.items():
        results = parse_answer(text, n)
        found = len(_scan_objects(text))
        assert len(results) == max(n, found), name


def _scan_objects(text):
    from pipeline.captions import _scan

    if not isinstance(text, str):
        return []
    objects, broken = _scan(text)
    return objects + broken


def test_subject_match_is_whole_words():
    assert subject_in_caption("a cat", "a cat on a mat")
    assert not subject_in_caption("a cat", "a catalogue on a table")
    assert subject_in_caption("The Teapot", "a teapot, steaming")


def test_subject_match_ignores_case_hyphens_punctuation_and_quote_styles():
    assert subject_in_caption("a stainless-steel kettle", "a stainless steel kettle on a gas stove")
    assert subject_in_caption("a stainless steel kettle", "A Stainless-Steel Kettle on a gas stove")
    assert subject_in_caption("a baker\u2019s hat", "a baker's hat hanging on a hook")
    assert subject_in_caption("\u201cthe old map\u201d", "an old map, pinned to a cork board")
    assert not subject_in_caption("a steel kettle", "a stainless steel pot on a stove")


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
    """One row per caption asked for: kept, or dropped with its reason; a failing call drops its captions."""
    cfg = CaptionConfig(backend="template", captions_per_request=2)
    cases = sorted(name for name, (_, n, _) in MALFORMED.items() if n == 2)
    requests = make_requests(len(cases) + 1, 0, 0, cfg)
    answers = {r["request_id"]: MALFORMED[name][0] for r, name in zip(requests, cases)}
    answers[requests[-1]["request_id"]] = ValueError("the tokenizer cannot encode this prompt")
    stage = CaptionStage(cfg)
    stage.backend = _Scripted(answers)
    out = stage(_batch(requests))
    counts = Counter(out["status"])
    expected = Counter(f"captions:{r}" if r else "ok" for name in cases for r in MALFORMED[name][2])
    expected["captions:error"] += 2
    assert counts == expected
    assert sum(counts.values()) == 2 * len(requests)
    raw = [e for e, s in zip(out["error"], out["status"]) if s == "captions:prose"]
    assert raw and raw[0].startswith("Sure! Here are some captions")  # the raw answer travels with its drop


def test_transformers_backend_runs_a_real_causal_lm(tiny_dir):
    """The tiny Llama writes noise; the stage must load it through from_pretrained and never crash."""
    cfg = CaptionConfig(backend="transformers", model="tiny:llama", max_new_tokens=24, captions_per_request=2)
    stage = CaptionStage(cfg)
    assert isinstance(stage.backend, TransformersBackend)
    out = stage(_batch(make_requests(3, 0, 0, cfg)))
    assert len(out["status"]) >= 3
    assert all(s == "ok" or s.startswith("captions:") for s in out["status"])


@pytest.mark.parametrize("n", [1, 8])
def test_vllm_context_length_holds_every_prompt_and_its_answer(tiny_dir, n):
    """vLLM reserves KV cache for max_model_len tokens per sequence: sized from the longest prompt the vocabulary
    can make plus the answer's budget, not the model's 131k context."""
    from transformers import AutoTokenizer

    from pipeline.captions import context_length, max_new_tokens, render_prompt
    from dreamcache.models import resolve

    cfg = CaptionConfig(backend="vllm", captions_per_request=n)
    tokenizer = AutoTokenizer.from_pretrained(resolve("tiny:llama"))
    length = context_length(cfg, tokenizer)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": render_prompt(r, cfg)}],
                                             add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for r in make_requests(300, 0, 0, cfg)]
    longest = max(map(len, prompts))
    assert longest + max_new_tokens(cfg) <= length <= 1.1 * (longest + max_new_tokens(cfg)) + 256 + 64
    assert length % 256 == 0


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


def test_the_prompt_asks_for_what_is_parsed_for_one_caption_and_for_eight():
    from pipeline.captions import render_prompt

    for n in (1, 8):
        cfg = CaptionConfig(backend="template", captions_per_request=n)
        request = make_requests(1, 0, 0, cfg)[0]
        text = render_prompt(request, cfg)
        assert len(request["contexts"]) == n  # one setting per caption
        assert f"Write {n} caption{'s' if n > 1 else ''}. " in text and f"exactly {n} object{'s' if n > 1 else ''}" in text
        assert ("one per caption" in text) == (n > 1)
        assert all(c in text for c in request["contexts"]) and f'category "{request["category"]}"' in text
        assert "teapot" not in text  # no fixed example subject to copy
    cfg = CaptionConfig(backend="template", captions_per_request=8, contexts_per_request=3)
    assert "reusing or combining them as needed" in render_prompt(make_requests(1, 0, 0, cfg)[0], cfg)


def test_constrained_decoding_makes_even_a_random_model_answer_in_the_schema(tiny_dir):
    """The tiny Llama has random weights: free-running, it never writes the answer's JSON. Constrained by
    xgrammar it writes nothing else: a JSON array of exactly n {"subject", "caption"} objects, every time."""
    pytest.importorskip("xgrammar")
    from pipeline.captions import _NOT_IN_WORDS, MAX_SUBJECT_WORDS, MAX_WORDS, MIN_WORDS

    answers = {}
    for constrained in (True, False):
        cfg = CaptionConfig(backend="transformers", model="tiny:llama", captions_per_request=1,
                            max_new_tokens=600 if constrained else 64, constrained=constrained)
        answers[constrained] = CaptionStage(cfg).backend.generate(make_requests(4, 0, 0, cfg))
    for text in answers[True]:
        items = json.loads(text, strict=False)
        assert isinstance(items, list) and len(items) == 1, text[:300]
        assert set(items[0]) == {"subject", "caption"}
        subject, caption = items[0]["subject"].split(" "), items[0]["caption"].split(" ")
        assert 1 <= len(subject) <= MAX_SUBJECT_WORDS and MIN_WORDS <= len(caption) <= MAX_WORDS
        # Words hold nothing the schema excludes. (Their lengths are not compared: random byte-level tokens can
        # end mid-character, and the decoder writes each stray byte as U+FFFD.)
        assert all(w and not re.search(f"[{_NOT_IN_WORDS}]", w) for w in subject + caption)
    for text in answers[False]:
        with pytest.raises(ValueError):
            json.loads(text, strict=False)


def test_a_broken_gpu_is_not_data():
    """CUDA errors and out-of-memory are the machine's, not the request's: outside Ray they are raised (inside
    a Ray actor they end the actor, which Ray replaces), never turned into drops that use up the plan."""
    import torch

    cfg = CaptionConfig(backend="template")
    requests = make_requests(2, 0, 0, cfg)
    for error in (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                  RuntimeError("CUDA error: an illegal memory access was encountered")):
        stage = CaptionStage(cfg)
        stage.backend = _Scripted({r["request_id"]: error for r in requests})
        with pytest.raises(type(error)):
            stage(_batch(requests))
