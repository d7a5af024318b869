"""LoRA adapters (docs/adapters.md).

``adapter``: PEFT adapters read and checked from headers; ``source``: an adapter as a merge source
(base + ΔW, lazily); ``factor``: exact low-rank algebra (cat, QR + small SVD, randomised SVD);
``export``: a merge written as one adapter; ``extract``: an adapter from a full fine-tune;
``scaling``: weight-only searches as per-module scalings of one live PEFT model; ``write``: atomic
adapter directories.
"""

from evomerge.lora.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, LoraAdapter, LoraModule,
                                   is_adapter_dir, lora_scale, read_adapter)
from evomerge.lora.source import AdapterReader, dora_weight, lora_delta, split_reference


def open_adapter_source(base, adapter_dir) -> AdapterReader:
    """A merge source: the reader ``base`` with the adapter in ``adapter_dir`` applied (checked, headers only)."""
    return AdapterReader(base, adapter_dir)


def open_source(path, base=None):
    """A reader for a model directory, or for an adapter directory applied to the reader ``base``."""
    from evomerge.checkpoint import ModelReader

    if is_adapter_dir(path):
        if base is None:
            raise AdapterError(f"{path}: a LoRA adapter needs the base model it was trained on")
        return AdapterReader(base, path)
    return ModelReader(path)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "AdapterReader", "LoraAdapter", "LoraModule",
           "dora_weight", "is_adapter_dir", "lora_delta", "lora_scale", "open_adapter_source", "open_source",
           "read_adapter", "split_reference"]
