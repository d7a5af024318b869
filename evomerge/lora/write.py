"""Writing an adapter directory atomically: into a temporary directory beside the target, then one rename."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from evomerge.checkpoint import staged
from evomerge.lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError


def check_output(out_dir: str | Path, overwrite: bool) -> Path:
    """``out_dir`` as an absolute path, refused when it exists and ``overwrite`` is off."""
    out = Path(out_dir).absolute()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise AdapterError(f"{out}: output directory exists; pass --overwrite to replace it")
        if out.is_symlink() or not out.is_dir():
            raise AdapterError(f"{out}: exists and is not a directory; refusing to replace it")
    return out


def write_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict, files: dict[str, str],
                  overwrite: bool) -> Path:
    """Write ``adapter_model.safetensors``, ``adapter_config.json`` and the text ``files``; no partial output."""
    out_dir = check_output(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out_dir
