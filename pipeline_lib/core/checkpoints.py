"""The base trainer's checkpoints: their file name, the code digest that goes into their fingerprint, and reading
one back (memory-mapped) only when its fingerprint matches."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from pipeline_lib.core import dist

CHECKPOINT_NAME = "last.pt"


def code_digest() -> str:
    """sha256 of the library's source, so a checkpoint made by other code is never resumed."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def read_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it belongs to a run with this fingerprint, else None (start fresh)."""
    path = Path(path)
    if not path.is_file():
        return None
    # Memory-mapped: peeking at the fingerprint or run id does not read the tensors; load_state_dict copies
    # them onto the parameters' device.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if state.get("fingerprint") != fingerprint:
        if dist.is_main():
            print(f"{path}: made with other params or data; starting from scratch")
        return None
    return state
