"""What must match between the workers of one study, so that a worker with another config is refused.

The first worker stores the fingerprint in the study; every worker that joins compares its own and
names each difference before running a trial. Models are compared by content, not path (each host may
keep them elsewhere: a worker-local config): by a hash of each safetensors file's header (every tensor's
name, dtype, shape and offsets) and of a sample of its weights (the first and last 64 KiB: fine-tunes
of one base share their headers), read in milliseconds without loading the model.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any


SAMPLE_BYTES = 64 * 1024


def safetensors_digest(model_dir: str | Path) -> str:
    """A short sha256 over a model's ``*.safetensors`` files, in file-name order: each file's header and the
    first and last ``SAMPLE_BYTES`` of its tensor data."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return "no-safetensors"
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            h.update(fh.read(n))
            data_start, size = 8 + n, f.stat().st_size
            h.update(fh.read(SAMPLE_BYTES))
            fh.seek(max(data_start, size - SAMPLE_BYTES))
            h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def fingerprint(run) -> dict[str, Any]:
    """The parts of a run that all workers of its study must share."""
    cfg = run.cfg
    return {
        "method": run.space.method,
        "objectives": cfg.objectives,
        "search_metric": cfg.search_metric,
        "sampler": cfg.sampler.name,
        "tasks": [t.name for t in run.task_specs],
        "base_model": safetensors_digest(run.inputs.base_model),
        "models": {name: safetensors_digest(p) for name, p in run.inputs.models.items()},
    }


def differences(stored: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """Each key whose value differs, as 'key: study has X, this worker has Y' (models one by one)."""
    out = []
    for key in sorted(set(stored) | set(mine)):
        a, b = stored.get(key), mine.get(key)
        if a == b:
            continue
        if key == "models" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    out.append(f"models.{name}: study has {_show(a.get(name))}, this worker has {_show(b.get(name))}")
            continue
        out.append(f"{key}: study has {_show(a)}, this worker has {_show(b)}")
    return out


def _show(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef" for c in v):
        return f"files with hash {v}"
    return repr(v)
