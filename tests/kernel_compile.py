"""Compile the device path's Triton kernels for an NVIDIA GPU on a machine without one.

Triton's interpreter (which ``tests/test_device_kernels.py`` runs the kernels in) executes the
kernels' Python, so code it accepts can still fail Triton's compiler: a kernel once passed every
interpreter test and did not compile on the H200 (two ``return`` statements of different types
under a ``constexpr`` ``if``). Compiling needs no GPU: Triton's front end and its bundled ``ptxas``
run on the CPU. ``record_launches`` notes the specializations a builder launches (argument types,
``constexpr`` values, launch options); ``main`` compiles each one for the targets.

    python -m tests.kernel_compile < specs.json   # [{"kernel", "signature", "constexprs", "options"}]

Prints a line per specialization and target and exits with 1 if any failed. Run it without
``TRITON_INTERPRET`` (the interpreter replaces the kernels' callees with Python functions).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys

KERNELS = ("_lane_sums_kernel", "_rescale_kernel", "_merge_kernel")
TARGETS = [("cuda", 90, 32), ("cuda", 80, 32)]  # Hopper (H100, H200: checked on one), Ampere (A100)
_POINTER = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16", "int8": "i8",
            "uint8": "u8", "int16": "i16", "int32": "i32", "int64": "i64", "bool": "i1"}


def _arg_type(value) -> str:
    """Triton's signature type of a launch argument (a tensor's pointer type, or a scalar's)."""
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _POINTER[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def spec_of(name: str, fn, args: tuple, kwargs: dict) -> str:
    """One launch as a JSON spec: each parameter's type, or its value if it is a ``constexpr``."""
    params = list(inspect.signature(fn).parameters.values())
    given = dict(zip((p.name for p in params), args)) | {k: v for k, v in kwargs.items()
                                                           if k in {p.name for p in params}}
    signature, constexprs = {}, {}
    for p in params:
        if "constexpr" in str(p.annotation):
            signature[p.name], constexprs[p.name] = "constexpr", given[p.name]
        else:
            signature[p.name] = _arg_type(given[p.name])
    options = {k: v for k, v in kwargs.items() if k not in given}
    return json.dumps({"kernel": name, "signature": signature, "constexprs": constexprs, "options": options},
                      sort_keys=True)


@contextlib.contextmanager
def record_launches(seen: set[str]):
    """Within the block, every launch of the device kernels adds its spec (``spec_of``) to ``seen``."""
    from evomerge.backends import cuda_kernels as dk

    originals = {name: getattr(dk, name) for name in KERNELS}

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                seen.add(spec_of(self.name, self.kernel.fn, args, kwargs))
                return launch(*args, **kwargs)
            return run

    try:
        for name, kernel in originals.items():
            setattr(dk, name, Recorder(name, kernel))
        yield seen
    finally:
        for name, kernel in originals.items():
            setattr(dk, name, kernel)


def compile_spec(spec: dict, target: tuple) -> None:
    """Compile one spec for ``target`` (raises Triton's error if it does not compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from evomerge.backends import cuda_kernels as dk

    kernel = getattr(dk, spec["kernel"])
    names = kernel.arg_names  # the parameters in order (a spec's JSON keys are sorted)
    source = ASTSource(fn=kernel, signature={name: spec["signature"][name] for name in names},
                       constexprs={(names.index(k),): v for k, v in spec["constexprs"].items()})
    triton.compile(source, target=GPUTarget(*target), options=spec["options"])


def main() -> int:
    specs = json.load(sys.stdin)
    failed = 0
    for target, spec in ((t, s) for s in specs for t in TARGETS):
        label = f"sm_{target[1]} {spec['kernel']} {spec['constexprs']} {spec['signature']}"
        try:
            compile_spec(spec, target)
            print(f"OK   {label}")
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit status says so
            failed += 1
            cause = e
            while cause.__cause__ is not None:  # Triton chains the callee's error under the caller's
                cause = cause.__cause__
            print(f"FAIL {label}\n     {type(e).__name__}: {str(e)[-1500:]}\n     cause: {cause!r}"[:4000])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
