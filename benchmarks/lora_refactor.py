"""Σ wᵢ·ΔWᵢ of two LoRA adapters re-factorised to rank k: evomerge's QR + small SVD against PEFT's ``svd``.

PEFT's ``add_weighted_adapter(..., combination_type="svd")`` forms the dense d×d sum of the
adapters' updates and runs a full SVD of it; ``evomerge.lora.factor`` stacks the factors, takes two
thin QR factorisations and an SVD of the (Σr)×(Σr) core. Both give the best rank-k approximation;
the table reports the median times and the relative Frobenius difference of the two products.

    python benchmarks/lora_refactor.py [--sizes 1024 4096] [--rank 16] [--repeats 5] [--out results/bench/lora.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from evomerge.lora.factor import concatenate, truncate  # noqa: E402

WEIGHTS = (0.7, 0.5)


def peft_model(size: int, rank: int, seed: int = 0):
    """One size×size linear layer carrying two random rank-``rank`` PEFT adapters, ``a`` and ``b``."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(size, size, bias=False)

    config = dict(r=rank, lora_alpha=rank, target_modules=["proj"], init_lora_weights=False)
    model = get_peft_model(Net(), LoraConfig(**config), adapter_name="a")
    model.add_adapter("b", LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / size ** 0.5)
    return model


def time_peft(model, rank: int, repeats: int) -> tuple[float, torch.Tensor]:
    layer = model.base_model.model.proj
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        model.add_weighted_adapter(["a", "b"], list(WEIGHTS), f"svd{i}", combination_type="svd", svd_rank=rank)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), layer.get_delta_weight("svd0").detach()


def time_ours(model, rank: int, repeats: int) -> tuple[float, torch.Tensor, float]:
    layer = model.base_model.model.proj
    terms = [(w * layer.scaling[n], layer.lora_B[n].weight.detach(), layer.lora_A[n].weight.detach())
             for n, w in zip("ab", WEIGHTS)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = truncate(concatenate(terms), rank)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result.b @ result.a, result.discarded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rank", type=int, default=16, help="rank of each adapter and of the result")
    parser.add_argument("--repeats", type=int, default=5, help="runs of evomerge's path (PEFT: 1 at >= 4096, else 2)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        model = peft_model(size, args.rank)
        peft_s, peft_delta = time_peft(model, args.rank, 1 if size >= 4096 else 2)
        ours_s, our_delta, discarded = time_ours(model, args.rank, args.repeats)
        diff = float((our_delta - peft_delta).norm() / peft_delta.norm())
        rows.append(f"| {size}x{size} | {args.rank}+{args.rank} -> {args.rank} | {peft_s * 1e3:.1f} | "
                    f"{ours_s * 1e3:.2f} | {peft_s / ours_s:.0f}x | {diff:.1e} | {discarded:.3f} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# LoRA re-factorisation: QR + small SVD (evomerge) vs PEFT `add_weighted_adapter(svd)`", "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other "
        f"jobs while this ran, torch {torch.__version__} threads {torch.get_num_threads()}, CPU, float32. "
        f"Date: {datetime.date.today()}. Command: `python benchmarks/lora_refactor.py --sizes "
        f"{' '.join(map(str, args.sizes))} --rank {args.rank} --repeats {args.repeats}`. Two random adapters, "
        f"weights {list(WEIGHTS)}; median times in ms (PEFT: one run at 4096, two below).", "",
        "| module | ranks | PEFT svd (ms) | evomerge QR+SVD (ms) | speed-up | relative difference of ΔW_k | "
        "discarded energy |",
        "|---|---|---:|---:|---:|---:|---:|", *rows, "",
        "The relative difference is ‖ΔW_evomerge − ΔW_PEFT‖_F / ‖ΔW_PEFT‖_F of the rank-k products; the discarded "
        "energy fraction is what truncating Σ wᵢΔWᵢ (rank 32) to rank 16 loses, which evomerge reports per module "
        "and PEFT does not. PEFT's time is the whole `add_weighted_adapter` call (new adapter included; its dense SVD with full_matrices=True dominates at 4096); evomerge's is `concatenate` + `truncate` on the same factors.", ""])
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
