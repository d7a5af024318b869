"""What the candidate builder's tests share (recipes themselves: ``evomerge.testing.recipes``)."""

from __future__ import annotations

import torch


def assert_live_equals(builder, expected: dict[str, torch.Tensor], label: str) -> None:
    """The builder's live model holds exactly ``expected`` (the engine's output), tensor by tensor."""
    live = builder.model.state_dict()
    assert set(expected) <= set(live), label
    bad = [k for k, v in expected.items() if not torch.equal(v, live[k])]
    assert not bad, f"{label}: {len(bad)} tensors differ from the engine, e.g. {bad[:3]}"


def source(model: str, lo: int, hi: int, **params) -> dict:
    """One ``slices:`` source: layers [lo, hi) of ``model``, with optional parameters."""
    return {"model": model, "layer_range": [lo, hi], **({"parameters": params} if params else {})}
