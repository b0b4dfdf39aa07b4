"""The one way a digest is taken here (checkpoints, the data a run saw, the folder cache, the replicas'
weights): sha256 over tensors by dtype, shape and bytes, over everything else by type and repr, dict keys in
sorted order. So a structure that torch.save wrote and torch.load gave back hashes the same.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch


def digest(*values: Any) -> str:
    h = hashlib.sha256()
    for value in values:
        feed(h, value)
    return h.hexdigest()


def feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}:".encode())
        for key, item in sorted(value.items(), key=lambda kv: repr(kv[0])):
            h.update(repr(key).encode())
            feed(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}:".encode())
        for item in value:
            feed(h, item)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())
