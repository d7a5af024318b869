"""Reading a merged model's tensors back, for tests and benchmarks that compare them."""

from __future__ import annotations

from pathlib import Path

import torch


def read_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model directory (single file or shards)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out
