"""The ``moe`` search-space kind of ``evomerge search``: MoE options searched with storage, resume, workers,
pruning, validation re-ranking and export like any merge search (docs/moe.md, "Search").

A space file with ``kind: moe``::

    kind: moe
    gate_modes: [zero, router_input_mean, supervised]   # router initialisations to choose from (first: default)
    experts_per_token: [1, 2]                            # first: default
    non_expert: {low: 0.0, high: 1.0, default: 0.0}      # per-expert weight w_i of the non-expert task
                                                         # arithmetic base + Σ w_i (expert_i − base); null: the base's
    train_steps: [0]                                     # router-training steps to choose from
    train: {lr: 0.01, batch_size: 16, balance: 0.01}     # the rest of ``train:`` (evomerge moe's keys, no steps)
    calibration: {split: search, examples: 32}           # routing prompts: the run's task file
    expert_tasks: {rev: [rev]}                           # default: an expert named after tasks routes them

The run's fine-tunes are the experts, in config order. Every dimension is a float, so every sampler works
on one box: a choice among n options is a number in [0, n) (floored), each expert's non-expert weight a
number in its range. The default point (the first trial) is the first option of each list and every
weight at its ``default``; the anchors add the default point with each other router initialisation.

A point decodes to a :class:`MoeCandidate` (recorded as YAML in the study like a recipe). The builder
(``moe.space_builder``) keeps one MoE resident and rewrites its non-expert weights, experts per token and
routers per candidate; the winner is exported with the atomic MoE writer beside the ``evomerge moe``
config that rebuilds it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from evomerge.moe.build import NON_EXPERT_RECIPE  # beside a rebuild config: the winner's non-expert weights
from evomerge.moe.config import DATA_FREE_MODES, GATE_MODES, MoeCalibration, MoeConfig, MoeError, RouterTraining
from evomerge.recipe import pydantic_message
from evomerge.search.space import Range, SpaceError



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpaceTraining(RouterTraining):
    """``train:`` of an MoE space: ``evomerge moe``'s router-training keys; the steps are searched."""

    steps: int = 0

    @model_validator(mode="after")
    def _steps_searched(self):
        if self.steps:
            raise ValueError("steps are searched in an moe space: list the options in train_steps, e.g. [0, 20]")
        return self


class SpaceCalibration(_Strict):
    """Where routing prompts come from: the run's task file, this split (never validation or test)."""

    split: Literal["search", "train"] = "search"
    examples: int = Field(32, ge=1)


class MoeCandidate(_Strict):
    """One point of an MoE space: what a trial builds (recorded in the study as YAML)."""

    name: str | None = None
    gate_mode: Literal[GATE_MODES]
    experts_per_token: int = Field(ge=1)
    train_steps: int = Field(0, ge=0)
    non_expert_weights: dict[str, float] = {}  # expert name -> w_i (empty: the base's non-expert weights)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)


def load_candidate(text: str, where: str = "trial") -> MoeCandidate:
    """A candidate from its recorded YAML."""
    try:
        return MoeCandidate.model_validate(yaml.safe_load(text))
    except (ValidationError, yaml.YAMLError) as e:
        raise MoeError(f"{where}: not an MoE candidate: {e}") from None


class MoeSpace(_Strict):
    """An MoE search space (see the module docstring); ``bind`` it to the run's models before use."""

    kind: Literal["moe"]
    gate_modes: list[Literal[GATE_MODES]] = Field(["zero", "router_input_mean", "supervised"], min_length=1)
    experts_per_token: list[int] = Field([1, 2], min_length=1)
    non_expert: Range | None = Field(default_factory=lambda: Range(low=0.0, high=1.0, default=0.0))
    train_steps: list[int] = Field([0], min_length=1)
    train: SpaceTraining = SpaceTraining()
    calibration: SpaceCalibration = SpaceCalibration()
    expert_tasks: dict[str, list[str]] | None = None
    architecture: str | None = None
    activations: Literal["model", "float32"] = "float32"
    max_length: int = Field(128, ge=2)
    description: str = ""
    _base: str = PrivateAttr(default="")  # set by ``bind``: the base model and the experts (name -> path)
    _experts: dict[str, str] = PrivateAttr(default_factory=dict)

    # what the search loop and the reports read of every space
    @property
    def method(self) -> str:
        return "moe"

    @property
    def granularity(self) -> str:
        return "moe"

    @property
    def attn_mlp(self) -> bool:
        return False

    def off_center(self) -> list[str]:
        return []

    def with_calibration_tasks(self, tasks, models, task_names) -> "MoeSpace":
        """Routing prompts are read by the builder from the run's task file (``moe_config``)."""
        return self

    # -- binding (headers and tokenizers only) --------------------------------------------------------
    def bind(self, base_model: str, models: dict[str, str], where: str = "search_space") -> "MoeSpace":
        """Check the space against the run's models, reading only config.json files and tokenizers: every
        ``experts_per_token`` within 1..experts, ``expert_tasks`` naming run models, and base and experts
        forming one MoE (``moe.config.check_models``)."""
        from evomerge.moe.config import check_models

        n, problems = len(models), []
        bad = [k for k in self.experts_per_token if not 1 <= k <= n]
        if bad:
            problems.append(f"experts_per_token: {bad} outside 1..{n} (the run has {n} models, one expert each)")
        if self.train.top_k is not None and self.train.top_k > n:
            problems.append(f"train.top_k: {self.train.top_k} is more than the {n} experts")
        if any(s < 0 for s in self.train_steps):
            problems.append("train_steps: steps must be >= 0")
        for name in self.expert_tasks or {}:
            if name not in models:
                problems.append(f"expert_tasks.{name}: not one of the run's models ({', '.join(models)})")
        if problems:
            raise SpaceError("\n".join(f"{where}: {p}" for p in problems))
        bound = self.model_copy()
        bound._base, bound._experts = str(base_model), {k: str(v) for k, v in models.items()}
        try:
            check_models(bound.moe_config(MoeCandidate(gate_mode="zero", experts_per_token=1)))
        except MoeError as e:
            raise SpaceError(f"{where}: {e}") from None
        return bound

    def needs_prompts(self) -> bool:
        """Whether some candidate routes or trains from the experts' prompts."""
        return any(m not in DATA_FREE_MODES for m in self.gate_modes) or any(self.train_steps)

    # -- geometry ---------------------------------------------------------------------------------------
    def _lists(self) -> dict[str, list]:
        """Every list of options, by the candidate field it sets."""
        return {"gate_mode": self.gate_modes, "experts_per_token": self.experts_per_token,
                "train_steps": self.train_steps}

    def _choices(self) -> dict[str, list]:
        """The searched lists of options (a list of one option is not searched)."""
        return {k: v for k, v in self._lists().items() if len(v) > 1}

    def param_names(self, model_names=None, num_layers=None) -> list[str]:
        """``gate_mode``, ``experts_per_token``, ``train_steps`` (when searched), then ``w[expert]``."""
        return list(self._choices()) + ([f"w[{m}]" for m in self._experts] if self.non_expert else [])

    def distributions(self, model_names=None, num_layers=None):
        from optuna.distributions import FloatDistribution

        out = {k: FloatDistribution(0.0, float(len(v))) for k, v in self._choices().items()}
        if self.non_expert:
            r = self.non_expert
            out.update({f"w[{m}]": FloatDistribution(r.low, r.high, log=r.log) for m in self._experts})
        return out

    def default_point(self, model_names=None, num_layers=None) -> dict[str, float]:
        point = {k: 0.5 for k in self._choices()}
        if self.non_expert:
            point.update({f"w[{m}]": self.non_expert.default for m in self._experts})
        return point

    def anchor_points(self, model_names=None, num_layers=None) -> list[dict[str, float]]:
        """The default point, then the same with each other router initialisation."""
        first = self.default_point()
        if "gate_mode" not in first:
            return [first]
        return [first] + [{**first, "gate_mode": i + 0.5} for i in range(1, len(self.gate_modes))]

    # -- decoding ---------------------------------------------------------------------------------------
    def to_recipe(self, point: dict[str, float], *, base_model=None, models=None, num_layers=None,
                  dtype=None, name: str | None = None) -> MoeCandidate:
        """The candidate of a point (a choice is its list's entry at the floored number)."""
        picked = {k: v[min(max(int(math.floor(point[k])), 0), len(v) - 1)] if k in point else v[0]
                  for k, v in self._lists().items()}
        weights = {m: round(float(point[f"w[{m}]"]), 6) for m in self._experts} if self.non_expert else {}
        return MoeCandidate(name=name, **picked, non_expert_weights=weights if any(weights.values()) else {})

    def load_candidate(self, text: str, where: str = "trial") -> MoeCandidate:
        return load_candidate(text, where)

    # -- the MoE ------------------------------------------------------------------------------------------
    def expert_task_names(self, task_names: list[str]) -> dict[str, list[str]]:
        """Each expert's routing tasks: ``expert_tasks``, else the tasks it is named after."""
        from evomerge.calibration import own_tasks

        if self.expert_tasks is not None:
            return dict(self.expert_tasks)
        by_path = own_tasks(self._experts, task_names)
        return {m: by_path[p] for m, p in self._experts.items() if p in by_path}

    def moe_config(self, candidate: MoeCandidate, *, tasks: str | None = None, task_names: list[str] = (),
                   seed: int = 0, dtype: str | None = None, non_expert: str | None = None) -> MoeConfig:
        """The ``evomerge moe`` config of a candidate: the run's models as experts (routing prompts from
        ``tasks``' calibration split when given), its gate mode, experts per token and training steps;
        ``non_expert`` the recipe file of its non-expert weights (default: the base's)."""
        own = self.expert_task_names(task_names) if tasks else {}
        data: dict[str, Any] = {
            "base_model": self._base, "gate_mode": candidate.gate_mode, "experts_per_token": candidate.experts_per_token,
            "experts": [{"source_model": p, **({"tasks": own[m]} if m in own else {})} for m, p in self._experts.items()],
            "seed": seed, "non_expert": non_expert or "base", "activations": self.activations,
            "max_length": self.max_length, "train": {**self.train.model_dump(), "steps": candidate.train_steps}}
        if own:
            data["calibration"] = {"tasks": str(tasks), **self.calibration.model_dump()}
        if dtype:
            data["dtype"] = dtype
        if self.architecture:
            data["architecture"] = self.architecture
        try:
            return MoeConfig.model_validate(data)
        except ValidationError as e:
            raise MoeError(pydantic_message(e, "moe search space")) from None

    def make_builder(self, inputs, cfg, out: Path):
        """The resident MoE builder (``moe.space_builder.MoeSpaceBuilder``); refuses a run whose experts
        have no routing prompts when a candidate needs them."""
        from evomerge.evaluate import load_tasks
        from evomerge.moe.space_builder import MoeSpaceBuilder

        if cfg.dataflow is not None:
            raise SpaceError("dataflow: a data-flow stage stacks the layers of a dense winner; an moe search has none")
        if not isinstance(inputs.tasks, (str, Path)):
            raise SpaceError("search_space: an moe space reads routing prompts from the run's task file; "
                             "name a task file in tasks:")
        names = [t.name for t in load_tasks(inputs.tasks)]
        own = self.expert_task_names(names)
        missing = [m for m in self._experts if m not in own]
        if self.needs_prompts() and missing:
            raise SpaceError(f"search_space: experts {missing} have no routing tasks (not named after a task); "
                             f"give expert_tasks: {{{missing[0]}: [TASK]}} or search data-free gate_modes only")
        template = self.moe_config(MoeCandidate(gate_mode=self.gate_modes[0],
                                                experts_per_token=self.experts_per_token[0]),
                                   tasks=str(inputs.tasks), task_names=names, seed=cfg.seed, dtype=cfg.dtype)
        return MoeSpaceBuilder(template, list(self._experts), device=cfg.device)


def load_moe_space(data: dict, where: str) -> MoeSpace:
    """Validate a ``kind: moe`` mapping (errors name the file and key)."""
    try:
        return MoeSpace.model_validate(data)
    except ValidationError as e:
        raise SpaceError(pydantic_message(e, where)) from None


def rebuild_config(run, candidate: MoeCandidate) -> tuple[MoeConfig, dict[str, str]]:
    """The ``evomerge moe`` config that rebuilds ``candidate`` from scratch, and the files it names (the
    non-expert task-arithmetic recipe, when its weights are not all zero), to be written beside it."""
    from evomerge.moe.search import non_expert_recipe

    files = {}
    weights = run.builder.weights_of(candidate)
    if any(weights):
        files[NON_EXPERT_RECIPE] = yaml.safe_dump(non_expert_recipe(run.builder.built, weights), sort_keys=False)
    cfg = run.space.moe_config(candidate, tasks=str(run.inputs.tasks), task_names=[t.name for t in run.task_specs],
                               seed=run.cfg.seed, dtype=run.cfg.dtype,
                               non_expert=NON_EXPERT_RECIPE if files else None)
    return cfg, files


def export_winner(run, candidate: MoeCandidate, rows, *, checkpoint: bool) -> tuple[dict[str, str], str]:
    """Write the winner of an MoE search into the run directory: ``best_moe.yaml`` (+ its non-expert recipe),
    and with ``checkpoint`` the MoE itself in ``merged/`` by the atomic MoE writer (reloaded and compared
    with the live model before it is renamed into place; ``moe.write``), its card holding the test table.
    Returns the files written and the config's text."""
    from evomerge.moe.stats import router_statistics
    from evomerge.moe.write import write_moe
    from evomerge.search.export import write_atomic

    out, builder = run.out, run.builder
    cfg, files = rebuild_config(run, candidate)
    text = "# evomerge moe config rebuilding the search's winner: evomerge moe best_moe.yaml OUT_DIR\n" \
        + yaml.safe_dump(cfg.model_dump(exclude_none=True), sort_keys=False)
    for name, body in files.items():
        write_atomic(out / name, body)
    write_atomic(out / "best_moe.yaml", text)
    written = {"recipe": str(out / "best_moe.yaml"), **{n: str(out / n) for n in files}}
    if not checkpoint:
        return written, text
    builder.build(candidate)
    moe = builder.moe
    report = {"architecture": moe.arch, "base_model": cfg.base_model, "non_expert": cfg.non_expert,
              "experts": [e.source_model for e in cfg.experts], "shared_expert": None,
              "gate_mode": cfg.gate_mode, "experts_per_token": cfg.experts_per_token, "seed": cfg.seed,
              "dtype": str(moe.dtype).removeprefix("torch."), "training": builder.training,
              "search": {"run": str(out), "trial": candidate.name},
              "router_statistics": (router_statistics(moe, builder.built.tokenizer, builder.built.prompts,
                                                      cfg.max_length)
                                    if all(p.positive for p in builder.built.prompts) else []),
              "comparison_table": comparison_table(rows)}
    write_moe(moe, builder.built.tokenizer, cfg, out / "merged", report, overwrite=True, extra_files=files)
    written["checkpoint"] = str(out / "merged")
    return written, text


def comparison_table(rows) -> str:
    """The search's test rows (``card.ScoreRow``) as a markdown table for the MoE's card."""
    lines = ["| model | test aggregate | 95% CI |", "|---|---:|---|"]
    for r in rows:
        ci = "" if r.ci is None else f"[{r.ci[0]:.3f}, {r.ci[1]:.3f}]"
        lines.append(f"| {r.label} | {r.aggregate:.3f} | {ci} |")
    return "\n".join(lines) + "\n"
