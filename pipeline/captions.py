"""Stage 1: captions of one concrete subject in a context.

A *request* asks the LLM for ``captions_per_request`` captions of one category, offering as many settings
and a few styles as ideas (``make_requests`` seeds them deterministically from the run seed, so 400k
captions spread over the whole vocabulary). The answer is a JSON array of ``{"subject", "caption"}``
objects of exactly that length: with ``captions.constrained`` (the default) the backend enforces it while
decoding (vLLM's structured outputs; xgrammar's logits processor for transformers), and ``parse_answer``
still reads whatever a model writes without it (arrays anywhere in the text, fenced or not, several objects
per line, keys in any case). Every caption asked for is accounted for: kept, or dropped with a reason.
Backends only map prompts to raw text: ``vllm`` (production), ``transformers`` (any causal LM, also a GGUF
file) and ``template`` (no model: combinatorial captions from the vocabulary, in the same JSON form).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import CaptionConfig
from pipeline.stage import OK, Drop, end_actor_or_raise, is_infrastructure_error
from prompts import caption_request_template, load_vocabulary

MIN_WORDS, MAX_WORDS = 5, 60  # caption length accepted, in words
MAX_SUBJECT_WORDS = 8
MAX_WORD_CHARS = 24  # the schema's longest word: with the word counts, it bounds a runaway answer
MAX_SUBJECT_CHARS = MAX_SUBJECT_WORDS * (MAX_WORD_CHARS + 1)  # what the schema allows; longer is dropped
MAX_CAPTION_CHARS = MAX_WORDS * (MAX_WORD_CHARS + 1)
EXCERPT = 300  # characters of an answer kept with its drop, for the plan's report
_ARTICLE = re.compile(r"^(a|an|the|one)\s+", re.I)
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u2032": "'", "`": "'", "\u201c": '"',
                         "\u201d": '"'})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Not in a word of the answer's schema: white space as Python's str.split() sees it, control characters, the
# quote and the backslash (so no escape sequence either). As a regex character class body.
_NOT_IN_WORDS = r'\s\x00-\x1f\x7f\x85\xa0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000"\\'
_SEPARATORS = re.compile(r"[-\u2010\u2011\u2012\u2013\u2014_/]")


# ----------------------------------------------------------------------------------------------- requests

def vocabulary(cfg: CaptionConfig):
    """The vocabulary ``captions.vocabulary`` names (default: prompts/vocabulary.yaml)."""
    return load_vocabulary(cfg.vocabulary) if cfg.vocabulary else load_vocabulary()


def make_requests(n: int, seed: int, round_: int, cfg: CaptionConfig) -> list[dict[str, Any]]:
    """``n`` caption requests for one round; categories cycle so every category is asked equally often."""
    vocab = vocabulary(cfg)
    rng = random.Random(f"{seed}:{round_}")
    cats = [c.name for c in vocab.categories]
    settings = cfg.contexts_per_request or cfg.captions_per_request
    out = []
    for i in range(n):
        if i % len(cats) == 0:
            rng.shuffle(cats)
        out.append({
            "request_id": f"r{round_:02d}-{i:08d}",
            "category": cats[i % len(cats)],
            "contexts": rng.sample(vocab.contexts, min(settings, len(vocab.contexts))),
            "styles": rng.sample(vocab.styles, min(3, len(vocab.styles))),
            "seed": rng.getrandbits(31),
        })
    return out


def render_prompt(request: dict[str, Any], cfg: CaptionConfig) -> str:
    """The instruction for one request: n captions, n settings ("one per caption" only when they match)."""
    n, contexts = cfg.captions_per_request, list(request["contexts"])
    if len(contexts) == n:
        use = "one per caption" if n > 1 else "for the caption"
    else:
        use = "reusing or combining them as needed" if len(contexts) < n else f"picking {n}"
    return caption_request_template().format(
        n=n, captions="caption" if n == 1 else "captions", objects="object" if n == 1 else "objects",
        category=request["category"], contexts="; ".join(contexts), use=use,
        styles="; ".join(request["styles"]),
    )


def longest_request(cfg: CaptionConfig) -> dict[str, Any]:
    """A request of the longest category, contexts and styles the vocabulary holds: no real prompt is longer."""
    vocab = vocabulary(cfg)
    settings = min(cfg.contexts_per_request or cfg.captions_per_request, len(vocab.contexts))
    return {"category": max((c.name for c in vocab.categories), key=len),
            "contexts": sorted(vocab.contexts, key=len)[-settings:], "styles": sorted(vocab.styles, key=len)[-3:]}


def context_length(cfg: CaptionConfig, tokenizer) -> int:
    """Tokens a request can occupy: the longest chat prompt, then ``max_new_tokens``, with 10% to spare for
    the tokenizer's differences between phrases, rounded up to 256. vLLM reserves KV cache for this many tokens
    per sequence instead of the model's whole context (131,072 for Llama 3.2)."""
    chat = [{"role": "user", "content": render_prompt(longest_request(cfg), cfg)}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return -(-int(1.1 * (len(prompt) + max_new_tokens(cfg))) // 256) * 256


def caption_schema(n: int) -> dict[str, Any]:
    """The JSON schema of an answer: an array of exactly ``n`` {"subject", "caption"} objects whose strings
    obey the parser's word limits (subject: 1 to 8 words; caption: one line of 5 to 60 words; words of at
    most 24 characters). Lengths are bounded through the patterns: xgrammar ignores maxLength beside one."""
    word = rf"[^{_NOT_IN_WORDS}]{{1,{MAX_WORD_CHARS}}}"  # plain words: nothing to escape, nothing to split on
    subject = {"type": "string", "pattern": f"^{word}( {word}){{0,{MAX_SUBJECT_WORDS - 1}}}$"}
    caption = {"type": "string", "pattern": f"^{word}( {word}){{{MIN_WORDS - 1},{MAX_WORDS - 1}}}$"}
    item = {"type": "object", "additionalProperties": False, "required": ["subject", "caption"],
            "properties": {"subject": subject, "caption": caption}}
    return {"type": "array", "items": item, "minItems": n, "maxItems": n}


def max_new_tokens(cfg: CaptionConfig) -> int:
    """The generation limit: the configured one, or sized for the requested captions (about 80 tokens each:
    a 40-word caption, its subject and the JSON around them)."""
    return cfg.max_new_tokens or 80 * cfg.captions_per_request + 32


# ----------------------------------------------------------------------------------------------- parsing

def normalize_subject(subject: str) -> str:
    """'A  Ceramic teapot.' -> 'ceramic teapot' (lower case, no article, no surrounding punctuation)."""
    s = " ".join(subject.translate(_QUOTES).strip().strip("\"'.,;:!?").split()).lower()
    return _ARTICLE.sub("", s)


def _words(text: str) -> list[str]:
    """Words for matching: lower case, any quote style, hyphens and slashes as spaces, no punctuation."""
    t = _SEPARATORS.sub(" ", text.translate(_QUOTES).lower()).replace("'", "")
    return re.sub(r"[^\w\s]", " ", t).split()


def subject_in_caption(subject: str, caption: str) -> bool:
    """The subject phrase (without its article) appears in the caption as whole words, in order."""
    sub, cap = _words(normalize_subject(subject)), _words(caption)
    return bool(sub) and any(cap[i:i + len(sub)] == sub for i in range(len(cap) - len(sub) + 1))


def parse_answer(text: Any, n: int) -> list[dict[str, str] | Drop]:
    """Every caption of an answer to a request for ``n``, and a Drop for each of the ``n`` it did not give.

    Reads JSON arrays and objects wherever they are in the text (fenced, after an introduction, several per
    line, one array over many lines, wrapped as {"captions": [...]}), keys in any case. Each object becomes
    a caption or a drop with its reason; a broken object is ``truncated_json`` (the answer stops inside it)
    or ``invalid_json``; captions the answer lacks are ``empty``, ``prose`` (no JSON at all) or ``too_few``;
    captions beyond ``n`` are ``too_many``. So kept + dropped = max(n, objects found). Never raises.
    """
    if not isinstance(text, str) or not text.strip():
        return [Drop("empty", "")] * n
    objects, broken = _scan(text)
    results = [_check_item(obj, excerpt) for obj, excerpt in objects] + broken
    results = _take(results, n)
    if len(results) < n:
        reason = "prose" if not objects and not broken else "too_few"
        results += [Drop(reason, text.strip()[:EXCERPT])] * (n - len(results))
    return results


def _scan(text: str) -> tuple[list[tuple[Any, str]], list[Drop]]:
    """(objects with an excerpt, drops for broken objects) in the order they appear in ``text``.

    Decodes a JSON value at every "{" or "[" not inside one already decoded. A broken array is read element
    by element from its inside; a broken object is one drop, however many "{" follow it on its line.
    """
    decoder = json.JSONDecoder(strict=False)  # control characters inside strings: kept, cleaned later
    objects: list[tuple[Any, str]] = []
    broken: list[Drop] = []
    failed_at: int | None = None  # where the broken stretch since the last decoded value began
    i = 0
    while True:
        starts = [j for j in (text.find("{", i), text.find("[", i)) if j >= 0]
        if not starts:
            break
        j = min(starts)
        try:
            value, end = decoder.raw_decode(text, j)
        except json.JSONDecodeError:
            if text[j] == "{" and (failed_at is None or "\n" in text[failed_at:j]):
                if failed_at is not None:
                    broken.append(_broken(text[failed_at:j]))
                failed_at = j
            i = j + 1
            continue
        if failed_at is not None:
            broken.append(_broken(text[failed_at:j]))
            failed_at = None
        for item in _items(value):
            objects.append((item, json.dumps(item)[:EXCERPT] if not isinstance(item, str) else item[:EXCERPT]))
        i = end
    if failed_at is not None:
        broken.append(_broken(text[failed_at:]))
    return objects, broken


def _broken(segment: str) -> Drop:
    cut = segment.count("{") > segment.count("}") or segment.count('"') % 2
    return Drop("truncated_json" if cut else "invalid_json", segment[:EXCERPT])


def _items(value: Any) -> list[Any]:
    """The candidate objects in a decoded JSON value: an array's elements, an object, or a wrapper's list."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        keys = {str(k).strip().lower() for k in value}
        lists = [v for v in value.values() if isinstance(v, list)]
        if not keys & {"subject", "caption"} and len(lists) == 1:  # {"captions": [...]}
            return lists[0]
    return [value]


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
            out.append(Drop("too_many", r["caption"][:EXCERPT]))
    return out


def _check_item(obj: Any, excerpt: str) -> dict[str, str] | Drop:
    if not isinstance(obj, dict):
        return Drop("not_an_object", excerpt)
    fields = {str(k).strip().lower(): v for k, v in obj.items()}
    subject, caption = fields.get("subject"), fields.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        return Drop("missing_caption", excerpt)
    if not isinstance(subject, str) or not normalize_subject(subject):
        return Drop("missing_subject", excerpt)
    if len(caption) > MAX_CAPTION_CHARS or len(subject) > MAX_SUBJECT_CHARS:
        return Drop("too_long", excerpt)
    caption = " ".join(_CONTROL.sub(" ", caption).split())
    subject = normalize_subject(_CONTROL.sub(" ", subject))
    if len(subject.split()) > MAX_SUBJECT_WORDS:
        return Drop("subject_too_long", excerpt)
    if not MIN_WORDS <= len(caption.split()) <= MAX_WORDS:
        return Drop("caption_length", excerpt)
    if not subject_in_caption(subject, caption):
        return Drop("subject_not_in_caption", excerpt)
    return {"subject": subject, "caption": caption}


# ----------------------------------------------------------------------------------------------- backends

class TemplateBackend:
    """No model: fills the vocabulary into captions, answering with the JSON array an LLM is asked for."""

    def __init__(self, cfg: CaptionConfig):
        self.cfg, self.vocab = cfg, vocabulary(cfg)

    def generate(self, requests: list[dict[str, Any]]) -> list[str]:
        return [self._answer(r) for r in requests]

    def _answer(self, request: dict[str, Any]) -> str:
        rng = random.Random(int(request["seed"]))
        cat = self.vocab.category(str(request["category"]))
        items = []
        for _ in range(self.cfg.captions_per_request):
            words = [rng.choice(self.vocab.colours)] if self.vocab.colours and rng.random() < 0.6 else []
            if cat.attributes and rng.random() < 0.8:
                words.append(rng.choice(cat.attributes))
            subject = " ".join(words + [rng.choice(cat.nouns)])
            article = "an" if subject[0] in "aeiou" else "a"
            caption = f"{article} {subject} {rng.choice(list(request['contexts']))}"
            if len(request["styles"]):
                caption += f", {rng.choice(list(request['styles']))}"
            items.append({"subject": f"{article} {subject}", "caption": caption})
        return json.dumps(items, indent=1)


def _grammar_processor(tokenizer, vocab_size: int, n: int, compiled: dict):
    """xgrammar's logits processor for transformers, for an array of ``n`` captions (compiled once per n)."""
    try:
        import xgrammar
    except ImportError:
        raise ImportError("captions.constrained needs xgrammar for the transformers backend: pip install "
                          "'dreamcache[constrained]' (or xgrammar), or --set captions.constrained=false") from None
    if "compiler" not in compiled:
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        compiled["compiler"] = xgrammar.GrammarCompiler(info)
    if n not in compiled:
        compiled[n] = compiled["compiler"].compile_json_schema(json.dumps(caption_schema(n)), any_whitespace=False)
    return xgrammar.contrib.hf.LogitsProcessor(compiled[n])


class TransformersBackend:
    """Any causal LM through transformers' chat template and ``generate`` (CPU or GPU); ``captions.model``
    may also be a GGUF file (dequantised on load). Constrained to the answer's schema by xgrammar."""

    def __init__(self, cfg: CaptionConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from dreamcache.models import default_device, resolve

        self.cfg = cfg
        path = resolve(cfg.model)
        where = {"pretrained_model_name_or_path": path, "revision": cfg.revision}
        if path.endswith(".gguf"):
            where = {"pretrained_model_name_or_path": str(Path(path).parent), "gguf_file": Path(path).name}
        self.device = default_device()
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(**where, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype).to(self.device).eval()
        self._grammars: dict = {}
        if cfg.constrained:  # fail at load, not at the first batch
            _grammar_processor(self.tokenizer, self.model.config.vocab_size, cfg.captions_per_request, self._grammars)

    def generate(self, requests: list[dict[str, Any]]) -> list[str]:
        import torch

        chats = [[{"role": "user", "content": render_prompt(r, self.cfg)}] for r in requests]
        inputs = self.tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True,
                                                    return_tensors="pt", return_dict=True).to(self.device)
        processors = []
        if self.cfg.constrained:
            processors.append(_grammar_processor(self.tokenizer, self.model.config.vocab_size,
                                                 self.cfg.captions_per_request, self._grammars))
        torch.manual_seed(int(requests[0]["seed"]))  # batched sampling: reproducible for the same batches
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=True, temperature=self.cfg.temperature,
                                      top_p=self.cfg.top_p, max_new_tokens=max_new_tokens(self.cfg),
                                      pad_token_id=self.tokenizer.pad_token_id, logits_processor=processors)
        new = out[:, inputs["input_ids"].shape[1]:]  # (B, new tokens)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


class VLLMBackend:
    """vLLM's offline engine: ``LLM.chat`` over a batch of conversations, one seed per request, the answer
    constrained to its JSON schema by vLLM's structured outputs."""

    def __init__(self, cfg: CaptionConfig):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("captions.backend=vllm needs vLLM: pip install '.[vllm]' on a GPU machine, "
                              "or use --set captions.backend=transformers") from e
        from dreamcache.models import resolve

        self.cfg = cfg
        path, length = resolve(cfg.model), cfg.max_model_len
        if length is None and not path.endswith(".gguf"):
            from transformers import AutoTokenizer

            length = context_length(cfg, AutoTokenizer.from_pretrained(path, revision=cfg.revision))
        self.llm = LLM(model=path, revision=cfg.revision, dtype=cfg.dtype, seed=0,
                       gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=length)

    def generate(self, requests: list[dict[str, Any]]) -> list[str]:
        from vllm import SamplingParams

        structured = {}
        if self.cfg.constrained:
            from vllm.sampling_params import StructuredOutputsParams

            schema = caption_schema(self.cfg.captions_per_request)
            structured = {"structured_outputs": StructuredOutputsParams(json=schema, disable_any_whitespace=True)}
        chats = [[{"role": "user", "content": render_prompt(r, self.cfg)}] for r in requests]
        params = [SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                 max_tokens=max_new_tokens(self.cfg), seed=int(r["seed"]), **structured)
                  for r in requests]
        outputs = self.llm.chat(chats, params, use_tqdm=False)
        return [o.outputs[0].text if o.outputs else "" for o in outputs]


BACKENDS = {"template": TemplateBackend, "transformers": TransformersBackend, "vllm": VLLMBackend}


class CaptionStage:
    """Requests in, one row per caption asked for (or found beyond it) out: request_id, n, category, subject,
    caption, status, error. A failing backend call drops its requests' captions as ``captions:error``; the
    stage keeps going."""

    name = "captions"

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg
        self.backend = BACKENDS[cfg.backend](cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        requests = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["request_id"]))]
        answers = self._generate(requests)
        rows = []
        for req, answer in zip(requests, answers):
            n_asked = self.cfg.captions_per_request
            results = [answer] * n_asked if isinstance(answer, Drop) else parse_answer(answer, n_asked)
            for n, r in enumerate(results):
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
            if is_infrastructure_error(e):
                end_actor_or_raise(self.name, e)
            if len(requests) == 1:
                return [Drop("error", f"{type(e).__name__}: {e}"[:500])]
            return [a for r in requests for a in self._generate([r])]
