"""Where adapters come from: a file, a folder that holds ``adapters.safetensors`` (a training run's ``--out`` or an
export), or a Hugging Face repo id ("org/name", "org/name@revision") through ``huggingface_hub``: the hub when it
answers (the cache then holds the file), the cache alone offline (``HF_HUB_OFFLINE=1``) or when it does not.
A repo is looked up once per process, and named by the commit it gave ("org/name@<sha>"), so that a cache made
with it can find the same adapters again however the repo moves on."""

from __future__ import annotations

import functools
import re
from pathlib import Path

ADAPTERS_FILE = "adapters.safetensors"
CARD_FILE = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_repo_id(ref: str) -> bool:
    """Whether ``ref`` reads as a Hugging Face repo id and not as a path on this machine: it names nothing here,
    and its "org" is no folder here either (runs/sd1 beside runs/ is a typo, not a repo)."""
    if not _REPO_ID.match(ref) or ref.endswith(".safetensors"):
        return False
    path = Path(ref.partition("@")[0])
    return not path.exists() and not path.parent.exists()


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


def pinned(ref: str | Path, located: Path) -> str:
    """How to name adapters found at ``located`` from ``ref`` again later: a repo id with the commit its file came
    from ("org/name@<sha>", the snapshot folder the cache keeps it in); anything else as given."""
    if not is_repo_id(str(ref)) or located.parent.parent.name != "snapshots":
        return str(ref)
    return f"{str(ref).partition('@')[0]}@{located.parent.name}"


@functools.lru_cache(maxsize=None)
def hub_file(ref: str, filename: str) -> str:
    """``filename`` of the repo ``ref`` ("org/name[@revision]") from the Hugging Face hub or its cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, _, revision = ref.partition("@")
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        return hf_hub_download(repo, filename, revision=revision or None)
    except LocalEntryNotFoundError:  # offline, or the hub unreachable, and not in the cache
        raise FileNotFoundError(f"no adapter file at {ref}, and the Hugging Face repo {ref} is not in the cache and "
                                f"the hub cannot be reached (download it first where it can: `{fetch}`; or give a "
                                "local file or folder)") from None
    except RemoteEntryNotFoundError:
        raise FileNotFoundError(f"the Hugging Face repo {ref} has no {filename}: is it a DreamCache adapter "
                                "repo (python -m training.export writes one)?") from None
    except GatedRepoError:
        raise FileNotFoundError(f"the Hugging Face repo {repo} is gated: accept its terms on huggingface.co, then "
                                "log in (`hf auth login`) or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"the Hugging Face repo {repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"no adapter file or folder at {ref} here, and no Hugging Face repo {repo} (or it is "
                                "private: log in with `hf auth login` or set HF_TOKEN)") from None
    except Exception as e:  # noqa: BLE001 - the hub's HTTP and transport errors: one clear line, not a traceback
        detail = getattr(e, "server_message", None) or (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"no adapter file at {ref}: the Hugging Face hub could not give {repo}'s {filename} "
                                f"({type(e).__name__}: {detail})") from None
