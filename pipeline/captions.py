"""Stage 1: captions of one concrete subject in a context.

A *request* asks the LLM for ``captions_per_request`` captions of one category, offering a few contexts and
styles as ideas (``make_requests`` seeds them deterministically from the run seed, so 400k captions spread
over the whole vocabulary). The LLM answers one JSON object per line, ``{"subject": ..., "caption": ...}``;
``parse_answer`` turns any answer, however malformed, into captions and counted drops. Backends only map
prompts to raw text: ``vllm`` (production), ``transformers`` (any causal LM) and ``template`` (no model:
combinatorial captions from the vocabulary, written in the same JSON-lines form and parsed the same way).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import numpy as np

from pipeline.config import CaptionConfig
from pipeline.stage import OK, Drop
from prompts import caption_request_template, load_vocabulary

MIN_WORDS, MAX_WORDS = 5, 60  # caption length accepted, in words
MAX_SUBJECT_WORDS = 8
MAX_LINE_CHARS = 1000
_ARTICLE = re.compile(r"^(a|an|the|one)\s+", re.I)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.):])\s*")


# ----------------------------------------------------------------------------------------------- requests

def make_requests(n: int, seed: int, round_: int, cfg: CaptionConfig) -> list[dict[str, Any]]:
    """``n`` caption requests for one round; categories cycle so every category is asked equally often."""
    vocab = load_vocabulary()
    rng = random.Random(f"{seed}:{round_}")
    cats = [c.name for c in vocab.categories]
    out = []
    for i in range(n):
        if i % len(cats) == 0:
            rng.shuffle(cats)
        out.append({
            "request_id": f"r{round_:02d}-{i:08d}",
            "category": cats[i % len(cats)],
            "contexts": rng.sample(vocab.contexts, min(cfg.contexts_per_request, len(vocab.contexts))),
            "styles": rng.sample(vocab.styles, min(3, len(vocab.styles))),
            "seed": rng.getrandbits(31),
        })
    return out


def render_prompt(request: dict[str, Any], cfg: CaptionConfig) -> str:
    return caption_request_template().format(
        n=cfg.captions_per_request, category=request["category"],
        contexts="; ".join(request["contexts"]), styles="; ".join(request["styles"]),
    )


# ----------------------------------------------------------------------------------------------- parsing

def normalize_subject(subject: str) -> str:
    """'A  Ceramic teapot.' -> 'ceramic teapot' (lower case, no article, no trailing punctuation)."""
    s = " ".join(subject.strip().strip("\"'`.,;:").split()).lower()
    return _ARTICLE.sub("", s)


def subject_in_caption(subject: str, caption: str) -> bool:
    core = normalize_subject(subject)
    return bool(core) and re.search(rf"(?<!\w){re.escape(core)}(?!\w)", caption.lower()) is not None


def parse_answer(text: Any, limit: int) -> list[dict[str, str] | Drop]:
    """Every caption the answer holds (at most ``limit``) and a Drop for everything else in it.

    Accepts JSON lines, a JSON array of objects, and lines wrapped in code fences or list markers. Never
    raises: whatever the LLM wrote, the result is captions and reasons.
    """
    if not isinstance(text, str) or not text.strip():
        return [Drop("empty", "")]
    stripped = text.strip()
    if stripped.startswith("["):  # some models answer with one JSON array
        try:
            items = json.loads(stripped)
            if isinstance(items, list):
                return _take([_check_item(x, json.dumps(x)[:200]) for x in items], limit)
        except json.JSONDecodeError:
            pass
    results: list[dict[str, str] | Drop] = []
    for raw in stripped.splitlines():
        line = _LIST_MARKER.sub("", raw.strip()).strip().rstrip(",")
        if not line or line.startswith("```") or line in ("[", "]"):
            continue
        if len(line) > MAX_LINE_CHARS:
            results.append(Drop("too_long", line[:200]))
        elif "{" not in line:
            results.append(Drop("prose", line[:200]))
        else:
            results.append(_parse_line(line[line.index("{"):]))
    return _take(results, limit) if results else [Drop("prose", stripped[:200])]


def _take(results: list[dict[str, str] | Drop], limit: int) -> list[dict[str, str] | Drop]:
    """Keeps the first ``limit`` captions; any more were not asked for."""
    out, kept = [], 0
    for r in results:
        if isinstance(r, Drop):
            out.append(r)
        elif kept < limit:
            out.append(r)
            kept += 1
        else:
            out.append(Drop("too_many", r["caption"][:200]))
    return out


def _parse_line(line: str) -> dict[str, str] | Drop:
    try:
        obj, _ = json.JSONDecoder().raw_decode(line)
    except json.JSONDecodeError:
        reason = "truncated_json" if line.count("{") > line.count("}") or line.count('"') % 2 else "invalid_json"
        return Drop(reason, line[:200])
    return _check_item(obj, line[:200])


def _check_item(obj: Any, excerpt: str) -> dict[str, str] | Drop:
    if not isinstance(obj, dict):
        return Drop("not_an_object", excerpt)
    subject, caption = obj.get("subject"), obj.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        return Drop("missing_caption", excerpt)
    if not isinstance(subject, str) or not normalize_subject(subject):
        return Drop("missing_subject", excerpt)
    caption = " ".join(caption.split())
    subject = normalize_subject(subject)
    if len(subject.split()) > MAX_SUBJECT_WORDS:
        return Drop("subject_too_long", excerpt)
    if not MIN_WORDS <= len(caption.split()) <= MAX_WORDS:
        return Drop("caption_length", excerpt)
    if not subject_in_caption(subject, caption):
        return Drop("subject_not_in_caption", excerpt)
    return {"subject": subject, "caption": caption}


# ----------------------------------------------------------------------------------------------- backends

class TemplateBackend:
    """No model: fills the vocabulary into captions, answering in the LLM's JSON-lines format."""

    def __init__(self, cfg: CaptionConfig):
        self.cfg, self.vocab = cfg, load_vocabulary()

    def generate(self, requests: list[dict[str, Any]]) -> list[str]:
        return [self._answer(r) for r in requests]

    def _answer(self, request: dict[str, Any]) -> str:
        rng = random.Random(int(request["seed"]))
        cat = self.vocab.category(str(request["category"]))
        lines = []
        for _ in range(self.cfg.captions_per_request):
            words = [rng.choice(self.vocab.colours)] if rng.random() < 0.6 else []
            if cat.attributes and rng.random() < 0.8:
                words.append(rng.choice(cat.attributes))
            subject = " ".join(words + [rng.choice(cat.nouns)])
            article = "an" if subject[0] in "aeiou" else "a"
            caption = f"{article} {subject} {rng.choice(list(request['contexts']))}, {rng.choice(list(request['styles']))}"
            lines.append(json.dumps({"subject": f"{article} {subject}", "caption": caption}))
        return "\n".join(lines)


class TransformersBackend:
    """Any causal LM through transformers' chat template and ``generate`` (CPU or GPU)."""

    def __init__(self, cfg: CaptionConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.models import resolve

        self.cfg = cfg
        path = resolve(cfg.model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, revision=cfg.revision, dtype=dtype).to(self.device).eval()

    def generate(self, requests: list[dict[str, Any]]) -> list[str]:
        import torch

        chats = [[{"role": "user", "content": render_prompt(r, self.cfg)}] for r in requests]
        inputs = self.tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True,
                                                    return_tensors="pt", return_dict=True).to(self.device)
        torch.manual_seed(int(requests[0]["seed"]))  # batched sampling: reproducible for the same batches
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=True, temperature=self.cfg.temperature,
                                      top_p=self.cfg.top_p, max_new_tokens=self.cfg.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]  # (B, new tokens)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


class VLLMBackend:
    """vLLM's offline engine: ``LLM.chat`` over a batch of conversations, one seed per request."""

    def __init__(self, cfg: CaptionConfig):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("captions.backend=vllm needs vLLM: pip install '.[vllm]' on a GPU machine, "
                              "or use --set captions.backend=transformers") from e
        from pipeline.models import resolve

        self.cfg = cfg
        self.llm = LLM(model=resolve(cfg.model), revision=cfg.revision, dtype=cfg.dtype, seed=0,
                       gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len)

    def generate(self, requests: list[dict[str, Any]]) -> list[str]:
        from vllm import SamplingParams

        chats = [[{"role": "user", "content": render_prompt(r, self.cfg)}] for r in requests]
        params = [SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                 max_tokens=self.cfg.max_new_tokens, seed=int(r["seed"])) for r in requests]
        outputs = self.llm.chat(chats, params, use_tqdm=False)
        return [o.outputs[0].text if o.outputs else "" for o in outputs]


BACKENDS = {"template": TemplateBackend, "transformers": TransformersBackend, "vllm": VLLMBackend}


class CaptionStage:
    """Requests in, one row per caption or drop out (rows: request_id, n, category, subject, caption, status,
    error). A failing backend call drops its requests as ``captions:error``; the stage keeps going."""

    name = "captions"

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg
        self.backend = BACKENDS[cfg.backend](cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        requests = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["request_id"]))]
        answers = self._generate(requests)
        rows = []
        for req, answer in zip(requests, answers):
            results = answer if isinstance(answer, Drop) else parse_answer(answer, self.cfg.captions_per_request)
            for n, r in enumerate([results] if isinstance(results, Drop) else results):
                ok = not isinstance(r, Drop)
                rows.append({
                    "request_id": str(req["request_id"]), "n": n, "category": str(req["category"]),
                    "subject": r["subject"] if ok else "", "caption": r["caption"] if ok else "",
                    "status": OK if ok else f"captions:{r.reason}", "error": "" if ok else r.detail,
                })
        return {k: np.array([r[k] for r in rows], dtype=object if k != "n" else np.int64) for k in
                ("request_id", "n", "category", "subject", "caption", "status", "error")}

    def _generate(self, requests: list[dict[str, Any]]) -> list[str | Drop]:
        try:
            return list(self.backend.generate(requests))
        except Exception as e:
            if len(requests) == 1:
                return [Drop("error", f"{type(e).__name__}: {e}"[:500])]
            return [a for r in requests for a in self._generate([r])]
