"""Model files without pickle: weights as safetensors plus ``model.json`` naming the registry entry.

A Deep-Compression artifact (``"format": "deep_compression"`` in model.json) holds ``model.sqdc``
instead of safetensors (tasks/deep_compression.py); ``load_model`` reads either.

``model.json`` holds ``{"model": <registry name>, "kwargs": {...}, "input": {...}, ...}``; loading
rebuilds the module from the registry and fills it from the safetensors file, so no code is ever
deserialised. The ``input`` block tells a server how to turn raw pixels into the tensor the model
was trained on (shape, pixel scale, mean, std) and what the classes are called.

torch is imported where it is used: a process that only reads specs or numpy weights (the churn scoring
actors) should not pay ~180 MB for it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

WEIGHTS = "model.safetensors"
SPEC = "model.json"


def save_model(model: torch.nn.Module, directory: str | Path, name: str, kwargs: dict[str, Any],
               **meta: Any) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory``; returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # contiguous CPU copies: safetensors refuses shared or strided storage
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    return write_spec(directory, name, kwargs, **meta)


def write_spec(directory: str | Path, name: str, kwargs: dict[str, Any], **meta: Any) -> Path:
    """Write ``model.json`` (registry name, constructor kwargs, ``meta``) into ``directory``; returns it."""
    directory = Path(directory)
    spec = {"model": name, "kwargs": kwargs, **meta}
    (directory / SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return directory


def read_spec(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / SPEC
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: not a squeezelab model directory")
    return json.loads(path.read_text())


def load_model(directory: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the module named in ``model.json`` and load its weights; returns (model in eval mode, spec)."""
    directory = Path(directory)
    spec = read_spec(directory)
    if spec.get("format") == "deep_compression":  # pruned + shared + Huffman-coded: model.sqdc
        from tasks.deep_compression import load_compressed  # imports this module: import it late

        return load_compressed(directory)
    from safetensors.torch import load_file

    from tasks.common.registry import get_model

    model = get_model(spec["model"], **spec["kwargs"])
    model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=True)
    return model.eval(), spec


def artifact_bytes(directory: str | Path) -> int:
    """Bytes on disk of every file of the model: the size we report."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and exact bytes of a state dict: equal digests mean identical weights."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
