"""Seeds derived from names: a draw depends on what it is for, never on the order things happen to run in.

Sample keys, DreamBooth images and training draws all take their seed from a SHA-256 of their parts, so the
same sample gets the same noise in any batch, on any number of workers or ranks, after any resume.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts, bits: int = 63) -> int:
    """A ``bits``-bit seed from ``parts`` ("/"-joined): the first bytes of their SHA-256, big-endian, masked."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:-(-bits // 8)], "big") & ((1 << bits) - 1)


def generator(*parts):
    """A CPU ``torch.Generator`` seeded from ``parts``."""
    import torch

    return torch.Generator().manual_seed(derive_seed(*parts))
