"""Golden hashes: the bits evomerge computes, recorded once and checked after every refactor.

What is hashed (SHA-256 of every output tensor's name, dtype, shape and bytes; one digest per case):

1. ``evomerge merge`` (``run_merge``, file to file, CPU) for every registry method's default recipe
   and for every task-arithmetic variant's ``variant_recipe`` both ways round (defaults and
   flipped normalize/rescale), on a tiny float32 Llama family and its bfloat16 copy.
2. The candidate builder's live model after building a fixed list of recipes, for every backend
   it offers on the CPU (the compiled numba pass, the reference tensor by tensor, the Triton
   kernels in Triton's interpreter when Triton is installed), float32 and bfloat16.
3. The values of two short deterministic searches on the tiny zoo (``trials.csv`` without its
   timing columns): a DARE-TIES space (the compiled pass) and RegMean (tensor by tensor).

Exact float bits can differ between CPU types and library builds, so this is a script, not a
CI test: record on one machine, then ``check`` there after each change.

    python benchmarks/golden.py record [--out tests/golden/golden.json]
    python benchmarks/golden.py check  [--only merge,builder,search] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported: its kernels run on the CPU

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOLDEN = ROOT / "tests" / "golden" / "golden.json"
SEED = 3
TIMING_COLUMNS = {"build_s", "eval_s", "duration_s"}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order: name, dtype, shape, then the raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def families(work: Path) -> dict[str, dict[str, str]]:
    """The tiny float32 Llama family (base, ft0..ft2) and its bfloat16 copy."""
    from safetensors.torch import save_file

    from evomerge.testing.weights import read_weights
    from evomerge.tiny import build_tiny_family

    base, fts = build_tiny_family(work / "f32", family="llama", n_finetunes=3, seed=0, num_layers=4)
    f32 = {"base": str(base), **{f"ft{i}": str(p) for i, p in enumerate(fts)}}
    bf16 = {}
    for key, src in f32.items():
        dst = work / "bf16" / key
        dst.mkdir(parents=True)
        for f in Path(src).iterdir():
            if f.suffix != ".safetensors":
                (dst / f.name).write_bytes(f.read_bytes())
        config = json.loads((dst / "config.json").read_text())
        config["torch_dtype"] = config["dtype"] = "bfloat16"
        (dst / "config.json").write_text(json.dumps(config))
        save_file({k: v.to(torch.bfloat16) for k, v in read_weights(src).items()}, str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
        bf16[key] = str(dst)
    return {"float32": f32, "bfloat16": bf16}


def merge_cases(fams: dict) -> list[tuple[str, dict]]:
    """(label, recipe) for every registry method's default recipe and every variant both ways round."""
    from evomerge.methods import METHODS
    from evomerge.testing.recipes import VARIANT_NAMES, default_recipe, variant_recipe

    cases = []
    for dt, fam in fams.items():
        experts = [fam["ft0"], fam["ft1"], fam["ft2"]]
        for method, spec in METHODS.items():
            recipe = default_recipe(method, fam["base"], experts)
            if recipe is None or spec.calibration is not None:  # passthrough; data-aware methods: in the searches
                continue
            cases.append((f"{dt}/{method}/default", {**recipe, "dtype": dt}))
        for method in VARIANT_NAMES:
            for flip in (False, True):
                cases.append((f"{dt}/{method}/{'flipped' if flip else 'defaults'}",
                              {**variant_recipe(method, fam, flip=flip), "dtype": dt}))
    return cases


def run_merges(fams: dict, work: Path) -> dict[str, str]:
    from evomerge.engine import run_merge
    from evomerge.recipe import load_recipe
    from evomerge.testing.weights import read_weights

    out = {}
    for i, (label, data) in enumerate(merge_cases(fams)):
        try:
            out[label] = digest(read_weights(run_merge(load_recipe(data), work / f"merge{i}", device="cpu",
                                                       seed=SEED)))
        except Exception as e:  # a method refusing these models is part of the behaviour too
            out[label] = f"error: {type(e).__name__}: {e}"[:300]
    return out


def builder_recipes(fam: dict, method: str, dtype: str) -> list[dict]:
    """The recipes one builder of ``method`` builds in a row (values, structures and extreme densities)."""
    from evomerge.methods import VARIANTS
    from evomerge.testing.recipes import default_recipe, variant_recipe

    if method not in VARIANTS:
        return [{**default_recipe(method, fam["base"], [fam["ft0"], fam["ft1"], fam["ft2"]]), "dtype": dtype}]
    extreme = variant_recipe(method, fam, flip=False)
    extreme["models"][0]["parameters"]["density"] = 0.0
    extreme["models"][2]["parameters"]["density"] = [1.0, 0.0]
    recipes = [variant_recipe(method, fam, flip=False), variant_recipe(method, fam, flip=True),
               variant_recipe(method, fam, flip=False, scale=0.5, density0=0.2), extreme,
               {**variant_recipe(method, fam, flip=False), "parameters": {"lambda": 0.9}}]
    return [{**r, "dtype": dtype} for r in recipes]


def builder_backends() -> list[str]:
    """The candidate builder's backends that run on this machine's CPU."""
    import importlib.util

    names = ["cpu", "reference"]
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
        names.append("cuda")
    return names


def make_builder(fam: dict, models: dict, method: str, dtype: str, backend: str):
    """A candidate builder of ``method`` on the CPU with ``backend``."""
    from evomerge.search.builder import CandidateBuilder

    return CandidateBuilder(fam["base"], models, method=method, device="cpu", seed=SEED, dtype=dtype,
                            backend=backend)


def run_builders(fams: dict, quick: bool = False) -> dict[str, str]:
    from evomerge.methods import METHODS, VARIANTS
    from evomerge.recipe import load_recipe

    out = {}
    others = [m for m, spec in METHODS.items() if m not in VARIANTS and m != "passthrough" and spec.calibration is None]
    for dt, fam in fams.items():
        models = {k: fam[k] for k in ("ft0", "ft1", "ft2")}
        for method in [*VARIANTS, *others]:
            for backend in builder_backends() if method in VARIANTS else ["reference"]:
                if backend == "cuda" and dt == "float32" and method not in ("ties", "dare_ties", "della"):
                    continue  # the interpreter is slow: three variants in float32, every one in bf16
                if backend == "cuda" and quick and (dt, method) != ("bfloat16", "dare_ties"):
                    continue
                label = f"{dt}/{method}/{backend}"
                try:
                    builder = make_builder(fam, models, method, dt, backend)
                    recipes = builder_recipes(fam, method, dt)
                    for i, data in enumerate(recipes[:2] if backend == "cuda" and quick else recipes):
                        builder.build(load_recipe(data))
                        out[f"{label}/{i}"] = digest(builder.model.state_dict())
                    builder.close()
                except Exception as e:
                    out[label] = f"error: {type(e).__name__}: {e}"[:300]
                print(f"  builder {label}", flush=True)
    return out


def run_searches(work: Path) -> dict[str, list[list[str]]]:
    """Two short deterministic searches on the tiny zoo: trials.csv rows without the timing columns."""
    import yaml

    from evomerge.search.config import load_config
    from evomerge.search.export import write_trials_csv
    from evomerge.search.run import SearchRun
    from evomerge.zoo import build_zoo

    zoo = build_zoo(work / "zoo", size="tiny", seed=0, progress=False)
    out = {}
    for space, trials in (("dare_ties_per_layer.yaml", 30), ("regmean_per_layer.yaml", 8)):
        cfg = {"name": "golden", "base_model": str(zoo.base), "models": {k: str(v) for k, v in zoo.experts.items()},
               "tasks": str(zoo.tasks_yaml), "search_space": str(ROOT / "search_spaces" / space),
               "budget": {"trials": trials}, "sampler": {"name": "tpe"}, "pruner": {"name": "none"},
               "output_dir": str(work / space), "device": "cpu", "seed": 0, "top_k": 1}
        path = work / f"{space}.run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run = SearchRun(load_config(path))
        run.run()
        rows = list(csv.reader(write_trials_csv(run.study, work / f"{space}.csv").open()))
        keep = [i for i, h in enumerate(rows[0]) if h not in TIMING_COLUMNS]
        out[space] = [[r[i] for i in keep] for r in rows]
        print(f"  search {space}: {len(rows) - 1} trials", flush=True)
    return out


def compute(parts: list[str], quick: bool = False) -> dict:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    result = {}
    with tempfile.TemporaryDirectory(prefix="evomerge-golden-") as tmp:
        work = Path(tmp)
        fams = families(work)
        for part, fn in (("merge", lambda: run_merges(fams, work)), ("builder", lambda: run_builders(fams, quick)),
                         ("search", lambda: run_searches(work))):
            if part in parts:
                t0 = time.perf_counter()
                result[part] = fn()
                print(f"{part}: {len(result[part])} cases in {time.perf_counter() - t0:.0f} s", flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["record", "check"])
    ap.add_argument("--out", type=Path, default=GOLDEN)
    ap.add_argument("--only", default="merge,builder,search", help="comma-separated parts: merge, builder, search")
    ap.add_argument("--quick", action="store_true",
                    help="check: the Triton interpreter only for bf16 DARE-TIES (minutes fewer)")
    args = ap.parse_args()
    parts = args.only.split(",")
    if args.quick and args.action == "record":
        ap.error("record everything: --quick is for check")
    got = compute(parts, args.quick)
    if args.action == "record":
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        old.update(got)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
        print(f"recorded {', '.join(parts)} -> {args.out}")
        return 0
    want = json.loads(args.out.read_text())
    bad = 0
    for part in parts:
        golden = want.get(part, {})
        for key in sorted(got[part]):
            if golden.get(key) != got[part][key]:
                bad += 1
                print(f"MISMATCH {part}/{key}:\n  golden {str(golden.get(key))[:200]}\n  now    {str(got[part][key])[:200]}")
        skipped = len(set(golden) - set(got[part]))
        print(f"{part}: {len(got[part])} cases checked ({skipped} not run), "
              f"{'all identical' if not bad else 'MISMATCHES above'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
