"""Conformance: every candidate backend × task-arithmetic variant × dtype equals `evomerge merge`, bit for bit.

Each case builds a ``variant_recipe`` (gradients, filters, a dense input, a negative weight) with
one backend and compares the live model with the engine's output files for the same recipe and
seed; the engine runs once per recipe (module cache). The cpu and reference backends run here;
the cuda backend runs on a real GPU (``gpu`` marker) and, in Triton's interpreter on the CPU, in
``test_device_kernels.py``. Also: how ``backend=`` is chosen and refused, in the builder and in a
run config.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from evomerge.engine import run_merge
from evomerge.recipe import load_recipe
from evomerge.search.builder import CandidateBuilder
from evomerge.testing.recipes import VARIANT_NAMES, variant_recipe
from evomerge.testing.weights import read_weights

CPU_BACKENDS = ["cpu", "reference"]
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def engine_outputs(llama_family, tmp_path_factory):
    """``evomerge merge``'s tensors per (method, dtype), computed on first use."""
    root, made = tmp_path_factory.mktemp("engine"), {}

    def get(method: str, dtype: str) -> dict[str, torch.Tensor]:
        if (method, dtype) not in made:
            recipe = load_recipe({**variant_recipe(method, llama_family, flip=False), "dtype": dtype})
            made[method, dtype] = read_weights(run_merge(recipe, root / f"{method}-{dtype}", device="cpu", seed=3))
        return made[method, dtype]

    return get


def _check(builder: CandidateBuilder, expected: dict[str, torch.Tensor], label: str) -> None:
    live = builder.model.state_dict()
    bad = [k for k, v in expected.items() if not torch.equal(v, live[k].to("cpu", v.dtype))]
    assert not bad, f"{label}: {len(bad)} tensors differ from evomerge merge, e.g. {bad[:3]}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", VARIANT_NAMES)
def test_cpu_backends_equal_engine(llama_family, engine_outputs, method, dtype):
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    recipe = load_recipe({**variant_recipe(method, llama_family, flip=False), "dtype": dtype})
    for backend in CPU_BACKENDS:
        builder = CandidateBuilder(llama_family["base"], models, method=method, device="cpu", seed=3, dtype=dtype,
                                   backend=backend)
        assert builder.backend.name == backend
        builder.build(recipe)
        _check(builder, engine_outputs(method, dtype), f"{backend} {method} {dtype}")
        builder.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", VARIANT_NAMES)
def test_merge_streams_through_cpu_backend(llama_family, tmp_path, method, dtype):
    """`evomerge merge` on the CPU: the cpu backend's compiled pass (``backend="auto"``) equals the reference
    kernels bit for bit, with a TIES/breadcrumbs window bound inside runs of equal |δ| (bf16) or not."""
    recipe = load_recipe({**variant_recipe(method, llama_family, flip=False), "dtype": dtype})
    reference = read_weights(run_merge(recipe, tmp_path / "ref", device="cpu", seed=3, backend="reference"))
    compiled = read_weights(run_merge(recipe, tmp_path / "cpu", device="cpu", seed=3, backend="cpu"))
    assert reference.keys() == compiled.keys()
    bad = [k for k, v in reference.items() if not torch.equal(v, compiled[k])]
    assert not bad, f"{method} {dtype}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def test_tensor_kernel_choice():
    """Which path `evomerge merge` takes: the compiled pass for the family on the CPU, else the reference."""
    from evomerge.backends import tensor_kernel
    from evomerge.backends.cpu_stream import StreamKernel

    cpu = torch.device("cpu")
    assert isinstance(tensor_kernel("auto", cpu, "della"), StreamKernel)
    assert tensor_kernel("reference", cpu, "ties") is None
    assert tensor_kernel("auto", cpu, "task_arithmetic") is None  # no mask: the torch kernels are faster
    assert isinstance(tensor_kernel("cpu", cpu, "task_arithmetic"), StreamKernel)
    assert tensor_kernel("auto", cpu, "linear") is None
    assert tensor_kernel("auto", torch.device("cuda"), "ties") is None  # tensor by tensor on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", VARIANT_NAMES)
def test_gpu_backends_equal_engine(llama_family, engine_outputs, method, dtype, backend):
    """On a GPU: the GPU's result equals `evomerge merge` on the CPU (the same bits on both devices)."""
    models = {k: str(llama_family[k]) for k in ("ft0", "ft1", "ft2")}
    recipe = load_recipe({**variant_recipe(method, llama_family, flip=False), "dtype": dtype})
    builder = CandidateBuilder(llama_family["base"], models, method=method, device="cuda", seed=3, dtype=dtype,
                               backend=backend)
    builder.build(recipe)
    _check(builder, engine_outputs(method, dtype), f"{backend} {method} {dtype}")
    builder.close()


def test_backend_choice_and_refusals(llama_family):
    from evomerge.backends import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, "ties") == "cpu"
    assert resolve_backend("auto", cpu, "linear") == "reference"  # other methods: tensor by tensor
    assert resolve_backend("cpu", cpu, "slerp") == "reference"
    with pytest.raises(ValueError, match="backend must be one of auto, reference, cpu, cuda, got 'numba'"):
        resolve_backend("numba", cpu, "ties")
    with pytest.raises(ValueError, match="the cpu backend merges on the CPU only"):
        resolve_backend("cpu", torch.device("cuda"), "ties")
    models = {"a": str(llama_family["ft0"])}
    builder = CandidateBuilder(llama_family["base"], models, method="linear", device="cpu", backend="cpu")
    assert builder.backend.name == "reference"
    builder.close()


def test_run_config_backend_key_is_validated(tmp_path):
    from evomerge.search.config import ConfigError, load_config

    cfg = {"name": "t", "base_model": "b", "models": ["m"], "search_space": "s.yaml", "tasks": "t.yaml",
           "backend": "gpu"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="backend"):
        load_config(path)
    path.write_text(yaml.safe_dump({**cfg, "backend": "reference"}))
    assert load_config(path).backend == "reference"


def test_window_ranks_match_stable_ranks():
    """The linear-time window (``window_ranks``) keeps exactly the elements whose stable rank of |δ| is in
    [lo, hi), with many equal magnitudes at the bounds and signed zeros."""
    import numpy as np

    from evomerge.backends.window_host import window_ranks
    from evomerge.methods.sparsify import flat_ranks

    rng = np.random.default_rng(0)
    delta = (rng.integers(-6, 7, size=5000) * 0.25).astype(np.float32)  # ~13 distinct values
    delta[:50] = -0.0
    ranks = flat_ranks(torch.from_numpy(delta)).numpy()
    for lo, hi in [(0, 17), (1, 5000), (2500, 5000), (1234, 4321), (0, 4999), (777, 778)]:
        out = np.empty(5000, dtype=np.int32)
        window_ranks(delta, lo, hi, out)
        np.testing.assert_array_equal((out >= lo) & (out < hi), (ranks >= lo) & (ranks < hi), err_msg=f"{lo}, {hi}")


@pytest.mark.parametrize("shape", [(37, 300), (1000,), (4, 3, 5), (6, 2)])
def test_della_mask_as_field_matches_the_reference(monkeypatch, shape):
    """DELLA's mask written into the field a block of rows at a time (``della_mask_as_field``): 0 exactly
    where ``sparsify.della_mask`` keeps, 1 elsewhere."""
    import numpy as np

    from evomerge.backends import cpu_stream
    from evomerge.methods.fields import random_field
    from evomerge.methods.sparsify import della_mask

    monkeypatch.setattr(cpu_stream, "ROWS_ELEMENTS", 1000)  # several blocks of rows
    delta = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4).round() / 4  # many ties
    delta[0] = -0.0
    for density, epsilon in [(0.5, 0.1), (0.3, 0.25), (0.9, 0.05)]:
        field = random_field(shape, seed=3, tensor_name="w", model_index=0)
        expected = np.where(della_mask(delta, density, epsilon, field).reshape(-1).numpy(), 0.0, 1.0)
        got = field.reshape(-1).numpy().copy()
        cpu_stream.della_mask_as_field(delta, got, np.float32(density - epsilon), np.float32(epsilon))
        np.testing.assert_array_equal(got, expected.astype(np.float32), err_msg=f"{density}, {epsilon}")


@pytest.mark.parametrize("method", ["della", "ties", "dare_ties", "breadcrumbs"])
def test_stream_kernel_reuses_buffers_across_sizes(method):
    """One ``StreamKernel`` (per-thread buffers kept between tensors) merges tensors of changing sizes and
    dtypes to the same bits as fresh buffers; its result does not share memory with its buffers."""
    from evomerge.backends.cpu_stream import StreamKernel, merge_tensor
    from evomerge.methods import get_method

    merge = get_method(method)
    kernel = StreamKernel()
    model_params = [{"weight": 0.6, "density": 0.5, "epsilon": 0.1}, {"weight": 0.4, "density": 0.3, "epsilon": 0.1}]
    model_params = [{k: v for k, v in p.items() if k in {q.name for q in merge.params}} for p in model_params]
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape, dtype in [((64, 48), torch.bfloat16), ((5, 7), torch.bfloat16), ((300,), torch.float32),
                         ((64, 48), torch.float16), ((2, 3, 4), torch.bfloat16)]:
        base = torch.randn(shape, generator=gen).to(dtype)
        inputs = [(base.float() + 0.05 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(2)]
        got = kernel(merge, f"w{len(results)}", base, inputs, model_params, {}, 3)
        expected = merge_tensor(merge, f"w{len(results)}", base, inputs, model_params, {}, 3)
        assert got.dtype == dtype and torch.equal(got, expected), (shape, dtype)
        results.append((got, got.clone()))
    assert all(torch.equal(a, b) for a, b in results), "a later tensor overwrote an earlier result"


def test_giant_tasks_start_first():
    """Tensors of more than 1/GIANT_SHARE of a plan's elements are giants, largest first."""
    from evomerge.engine import GIANT_SHARE, TensorTask, giant_tasks

    def task(name, *shape):
        return TensorTask(name=name, shape=shape, method="ties", base=None, inputs=[], model_params=[], params={}, t=0.0)

    layers = [task(f"layers.{i}.w", 10, 10) for i in range(20)]
    tasks = [task("embed", 40, 10), *layers, task("head", 50, 10)]
    assert giant_tasks(tasks) == [len(tasks) - 1, 0]
    assert giant_tasks(layers) == []
    assert giant_tasks([task("one", 3, 3)]) == [0]
    assert GIANT_SHARE > 1
