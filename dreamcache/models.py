"""Model references: hub ids, local paths and the tiny profile's ``tiny:<name>`` models.

Every stage loads its models with ``from_pretrained(resolve(ref), revision=...)``: the tiny profile only
changes where the files are. ``check_available`` runs in the driver before any Ray work starts, so a
missing checkpoint fails in seconds with a message that says what to do, not after an hour of captions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dreamcache.errors import ModelNotFound

TINY_PREFIX = "tiny:"


def resolve(ref: str) -> str:
    """'tiny:sdxl' -> the local folder of the tiny SDXL (built on first use); anything else unchanged."""
    if ref.startswith(TINY_PREFIX):
        from dreamcache import tiny  # torch: only where tiny models are used

        name = ref[len(TINY_PREFIX):]
        try:
            return tiny.ensure_tiny_models(names=(name,))[name]
        except KeyError as e:
            raise ModelNotFound(f"{ref}: {e.args[0]}") from None
    return ref


def check_available(ref: str, revision: str | None, role: str, flag: str) -> None:
    """Raises ModelNotFound unless ``ref`` is a local folder, in the local HF cache, or reachable on the hub."""
    path = resolve(ref)
    if Path(path).expanduser().is_dir() or (path.endswith(".gguf") and Path(path).expanduser().is_file()):
        return  # a local model folder, or a GGUF file (the transformers caption backend reads those)
    if Path(path).expanduser().exists() or path.startswith((".", "/", "~")):
        raise ModelNotFound(f"{role}: {path} is not a model folder. Point {flag} at a folder in the Hugging Face "
                            "layout (the one with model_index.json or config.json).")
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(path, revision=revision, local_files_only=True)
        return
    except Exception:
        pass
    reason = "HF_HUB_OFFLINE is set"
    if not os.environ.get("HF_HUB_OFFLINE"):
        from huggingface_hub import HfApi

        try:
            HfApi().model_info(path, revision=revision, timeout=10)
            return  # the workers will download it
        except Exception as e:  # no network, gated without a token, typo: all end the same way
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise ModelNotFound(
        f"{role} {path!r}{f' @ {revision}' if revision else ''} is neither a local folder nor in the Hugging Face "
        f"cache, and the hub could not be reached ({reason}).\n"
        f"  - download it where the hub is reachable (huggingface-cli download {path}) and pass "
        f"{flag}=/path/to/local/copy\n"
        f"  - or run the whole job on tiny random models: --profile tiny"
    )


def default_device() -> str:
    """Where models run unless told otherwise: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def quiet_model_loading() -> None:
    """No per-model "Loading weights" / "Loading pipeline components" bars (downloads keep theirs), and no
    notice that an image processor falls back to PIL because torchvision is missing (the PIL processors are
    the ones used here)."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision (not installed)" not in record.getMessage())
