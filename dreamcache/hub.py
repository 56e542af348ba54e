"""Where adapters come from: a file, a folder that holds ``adapters.safetensors`` (a training run's ``--out`` or an
export), or a Hugging Face repo id ("org/name", "org/name@revision") through ``huggingface_hub``, which reads
its cache first (offline with ``HF_HUB_OFFLINE=1``, or whenever the hub cannot be reached)."""

from __future__ import annotations

import re
from pathlib import Path

ADAPTERS_FILE = "adapters.safetensors"
CARD_FILE = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_repo_id(ref: str) -> bool:
    """Whether ``ref`` reads as a Hugging Face repo id and names nothing on this machine."""
    return bool(_REPO_ID.match(ref)) and not Path(ref).exists() and not ref.endswith(".safetensors")


def locate_adapters(ref: str | Path) -> Path:
    """The adapter file ``ref`` names. A path that exists nowhere and is no repo id comes back as it is, for the
    caller's "no adapter file at ..." error."""
    path = Path(ref)
    if path.is_dir():
        if not (path / ADAPTERS_FILE).is_file():
            raise FileNotFoundError(f"{ref} is a folder without {ADAPTERS_FILE}: give the adapter file, a training "
                                    "run's --out, or a folder written by python -m training.export")
        return path / ADAPTERS_FILE
    if path.is_file() or not is_repo_id(str(ref)):
        return path
    return Path(hub_file(str(ref), ADAPTERS_FILE))


def hub_file(ref: str, filename: str) -> str:
    """``filename`` of the repo ``ref`` ("org/name[@revision]") from the Hugging Face cache or hub."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    repo, _, revision = ref.partition("@")
    try:
        return hf_hub_download(repo, filename, revision=revision or None)
    except LocalEntryNotFoundError:  # offline, or the hub unreachable, and not in the cache
        raise FileNotFoundError(f"no adapter file at {ref}, and the Hugging Face repo {repo} is not in the cache and "
                                "the hub cannot be reached (offline: download it first, e.g. `hf download "
                                f"{repo}`, or give a local file or folder)") from None
    except RemoteEntryNotFoundError:
        raise FileNotFoundError(f"the Hugging Face repo {repo} has no {filename}: is it a DreamCache adapter "
                                "repo (python -m training.export writes one)?") from None
    except (OSError, ValueError) as e:  # no such repo or revision, private, gated, a malformed id
        first = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(f"no adapter file at {ref}, and no Hugging Face repo {repo} could give one "
                                f"({type(e).__name__}: {first})") from None
