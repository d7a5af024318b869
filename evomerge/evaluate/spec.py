"""Task specs (YAML, pydantic, extra="forbid", strict) and `load_tasks`, which validates everything.

The format is described in `.notes/TASKS_FORMAT.md`. `load_tasks` reads and renders every native
example of every split, so a missing file, a malformed line, a missing template field, an empty or
overlapping split or an out-of-range label is a `TaskError` naming the file, key and line, before
any model runs. lm-eval tasks are checked here for their local paths; the task itself is loaded by
the Evaluator (see `lm_eval_adapter.py`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .data import (
    SPLITS,
    TRAIN,
    Example,
    TaskError,
    check_disjoint,
    read_jsonl,
    read_split_file,
    render_multiple_choice,
    render_target,
    split_indices,
    template_fields,
)
from .metrics import NATIVE_METRICS

KINDS = ("multiple_choice", "generate", "loglikelihood", "lm_eval")
DEFAULT_SPLIT = {"seed": 0, "search": 0.5, "validation": 0.25, "test": 0.25}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SplitFractions(_Strict):
    """Split one file (or an lm-eval task's evaluation docs) by a seeded permutation."""

    seed: int = Field(0, ge=0)
    search: float = Field(gt=0, le=1)
    validation: float = Field(gt=0, le=1)
    test: float = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = self.search + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"split fractions must sum to 1, got {total:g} "
                f"(search {self.search} + validation {self.validation} + test {self.test})"
            )
        return self

    def as_tuple(self) -> tuple[float, float, float]:
        """(search, validation, test) fractions."""
        return (self.search, self.validation, self.test)


class SplitFiles(_Strict):
    """Three JSONL files, one per split (paths relative to the task YAML), and optionally a fourth with
    training examples for ``evomerge finetune`` (disjoint from the other three; never scored)."""

    search: str
    validation: str
    test: str
    train: str | None = None


class SplitNames(_Strict):
    """lm-eval only: which dataset split of the lm-eval task serves as each of our splits."""

    search: str
    validation: str
    test: str


class _TaskBase(_Strict):
    name: str = Field(min_length=1)
    weight: float = Field(1.0, ge=0)
    higher_is_better: bool | None = None

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("weight must be finite")
        return v


class _NativeTask(_TaskBase):
    data: str | None = None
    split: SplitFractions | None = None
    splits: SplitFiles | None = None
    prompt: str

    _examples: dict[str, list[Example]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_common(self):
        if self.data is None and self.splits is None:
            raise ValueError("give `data` (one JSONL file, split by `split`) or `splits` (one file per split)")
        if self.data is not None and self.splits is not None:
            raise ValueError("give either `data` or `splits`, not both")
        if self.splits is not None and self.split is not None:
            raise ValueError("`split` (fractions) only applies to `data`; with `splits` the files are the splits")
        _check_template(self.prompt, "prompt")
        natural = NATIVE_METRICS[self.metric].higher_is_better
        if self.higher_is_better is not None and self.higher_is_better != natural:
            raise ValueError(
                f"metric {self.metric!r} is {'higher' if natural else 'lower'}-is-better; "
                f"higher_is_better: {self.higher_is_better} contradicts it"
            )
        return self

    def examples(self, split: str) -> list[Example]:
        """The rendered examples of `split` (requires the spec to come from `load_tasks`)."""
        if split not in (*SPLITS, TRAIN):
            raise TaskError(f"unknown split {split!r}; expected one of {', '.join((*SPLITS, TRAIN))}")
        if not self._examples:
            raise TaskError(f"task {self.name!r} has no data loaded; build specs with load_tasks()")
        if split not in self._examples:
            raise TaskError(f"task {self.name!r} has no {split} split (give `splits: {{{split}: FILE}}`)")
        return self._examples[split]

    def has_split(self, split: str) -> bool:
        """Whether `split` has examples loaded (the evaluation splits always do; `train` when it is given)."""
        return split in self._examples

    def render_row(self, row: dict[str, Any], source: str) -> Example:  # pragma: no cover - overridden
        raise NotImplementedError

    def _load(self, base_dir: Path) -> None:
        """Read, render, split and overlap-check the data files."""
        self._base_dir = base_dir
        if self.splits is not None:
            named = (*SPLITS, TRAIN) if self.splits.train is not None else SPLITS
            files = {s: _resolve(base_dir, getattr(self.splits, s)) for s in named}
            self._examples = {s: read_split_file(p, self.render_row) for s, p in files.items()}
        else:
            path = _resolve(base_dir, self.data)
            rows = read_jsonl(path)
            examples = [self.render_row(row, f"{path}:{lineno}") for lineno, row in rows]
            fractions = self.split or SplitFractions(**DEFAULT_SPLIT)
            idx = split_indices(len(examples), fractions.as_tuple(), fractions.seed, what=f"{path} (task {self.name!r})")
            self._examples = {s: [examples[i] for i in idx[s]] for s in SPLITS}
        check_disjoint(self._examples)


class MultipleChoiceTask(_NativeTask):
    """Score each choice by the sum of its token log-likelihoods given the prompt; acc / acc_norm."""

    kind: Literal["multiple_choice"]
    choices_field: str = "choices"
    label_field: str = "label"
    choice: str = " {choice}"
    metric: Literal["acc", "acc_norm"] = "acc"

    @field_validator("choice")
    @classmethod
    def _choice_template(cls, v: str) -> str:
        if "choice" not in _check_template(v, "choice"):
            raise ValueError(f"the `choice` template {v!r} must contain {{choice}}")
        return v

    def render_row(self, row: dict[str, Any], source: str) -> Example:
        """One JSONL line as a multiple-choice Example."""
        return render_multiple_choice(
            row, prompt=self.prompt, choice=self.choice, choices_field=self.choices_field,
            label_field=self.label_field, source=source,
        )


class GenerateTask(_NativeTask):
    """Greedy decoding until a stop string / EOS / max_new_tokens; exact_match against `target`."""

    kind: Literal["generate"]
    target: str
    metric: Literal["exact_match"] = "exact_match"
    normalize: list[Literal["strip", "lower", "remove_punctuation", "collapse_whitespace"]] = []
    max_new_tokens: int = Field(32, ge=1)
    stop: list[str] = ["\n"]

    @field_validator("target")
    @classmethod
    def _target_template(cls, v: str) -> str:
        _check_template(v, "target")
        return v

    @field_validator("stop")
    @classmethod
    def _nonempty_stops(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    def render_row(self, row: dict[str, Any], source: str) -> Example:
        """One JSONL line as a (prompt, target) Example."""
        return render_target(row, prompt=self.prompt, target=self.target, source=source)


class LoglikelihoodTask(_NativeTask):
    """Log-likelihood of `target` given `prompt`: mean per example, or token-level perplexity."""

    kind: Literal["loglikelihood"]
    target: str
    metric: Literal["loglikelihood", "perplexity"] = "loglikelihood"

    @field_validator("target")
    @classmethod
    def _target_template(cls, v: str) -> str:
        _check_template(v, "target")
        return v

    def render_row(self, row: dict[str, Any], source: str) -> Example:
        """One JSONL line as a (prompt, target) Example."""
        return render_target(row, prompt=self.prompt, target=self.target, source=source)


class LmEvalTask(_TaskBase):
    """Any lm-eval task (built-in or from `include_path`), scored on the live model through HFLM."""

    kind: Literal["lm_eval"]
    task: str = Field(min_length=1)
    include_path: str | None = None
    metric: str = Field(min_length=1)  # "acc,none": lm-eval metric name and filter
    limit: int | None = Field(None, ge=1)
    num_fewshot: int | None = Field(None, ge=0)
    fewshot_seed: int = 1234
    split: SplitFractions | None = None
    split_names: SplitNames | None = None

    _include_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self):
        if self.split is not None and self.split_names is not None:
            raise ValueError("give either `split` (fractions of the task's evaluation docs) or `split_names`, not both")
        if self.split_names is not None and len({self.split_names.search, self.split_names.validation, self.split_names.test}) < 3:
            raise ValueError("`split_names` must name three different lm-eval splits (our splits must be disjoint)")
        return self

    @property
    def metric_name(self) -> str:
        """The lm-eval metric, e.g. "acc" of "acc,none"."""
        return self.metric.split(",", 1)[0]

    @property
    def filter_name(self) -> str:
        """The lm-eval filter, e.g. "none" of "acc,none"."""
        return self.metric.split(",", 1)[1] if "," in self.metric else "none"

    @property
    def include_dir(self) -> Path | None:
        """The resolved include_path directory."""
        return self._include_dir

    @property
    def fractions(self) -> SplitFractions:
        """The split fractions in use when `split_names` is not given."""
        return self.split or SplitFractions(**DEFAULT_SPLIT)

    def _load(self, base_dir: Path) -> None:
        """Resolve and check include_path."""
        self._base_dir = base_dir
        if self.include_path is not None:
            path = _resolve(base_dir, self.include_path)
            if not path.is_dir():
                raise TaskError(f"include_path {path} of lm_eval task {self.name!r} is not a directory")
            self._include_dir = path


TaskSpec = Annotated[
    Union[MultipleChoiceTask, GenerateTask, LoglikelihoodTask, LmEvalTask], Field(discriminator="kind")
]


class TaskFile(_Strict):
    """A task YAML file: `tasks: [...]`."""

    tasks: list[TaskSpec] = Field(min_length=1)


def _check_template(template: str, key: str) -> set[str]:
    """The fields of a template, or ValueError naming the key if it is malformed."""
    try:
        return template_fields(template)
    except ValueError as exc:
        raise ValueError(f"bad `{key}` template: {exc}") from None


def _resolve(base_dir: Path, path: str) -> Path:
    """`path` relative to the task file's directory (absolute paths unchanged)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def load_tasks(source: str | Path | dict | list, *, base_dir: str | Path | None = None) -> list:
    """Parse, validate and load every task of a task YAML file (or an equivalent dict / list).

    Relative paths resolve against the YAML file's directory (or `base_dir`, default cwd, for
    dicts). Returns the task specs with their examples loaded; raises TaskError on bad input.
    """
    if isinstance(source, list) and all(isinstance(t, BaseModel) for t in source):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise TaskError(f"{path}: task file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise TaskError(f"{path}: invalid YAML: {exc}") from None
        where, base = str(path), path.resolve().parent
    else:
        raw, where = source, "<tasks>"
        base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    if isinstance(raw, list):
        raw = {"tasks": raw}
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: expected a mapping (one task, or `tasks: [...]`), got {type(raw).__name__}")
    single = "tasks" not in raw
    doc = {"tasks": [raw]} if single else raw
    try:
        parsed = TaskFile.model_validate(doc)
    except ValidationError as exc:
        raise TaskError(_describe_errors(exc, doc, where, single)) from None

    names = [t.name for t in parsed.tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TaskError(f"{where}: task names must be unique; {dupes[0]!r} appears {names.count(dupes[0])} times")
    if sum(t.weight for t in parsed.tasks) <= 0:
        raise TaskError(f"{where}: task weights sum to 0; give at least one task a positive weight")
    for task in parsed.tasks:
        try:
            task._load(base)
        except TaskError as exc:
            raise TaskError(f"{where}: task {task.name!r}: {exc}") from None
    return list(parsed.tasks)


def _describe_errors(exc: ValidationError, doc: dict, where: str, single: bool) -> str:
    """Pydantic errors rewritten as "file: tasks[i] (name 'x'): key: problem" lines."""
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        prefix = ""
        if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int):
            i = loc[1]
            task = doc["tasks"][i] if i < len(doc.get("tasks") or []) else {}
            name = task.get("name") if isinstance(task, dict) else None
            prefix = ("task" if single else f"tasks[{i}]") + (f" ({name!r})" if name else "")
            loc = loc[2:]
            if loc and loc[0] in KINDS:  # the discriminator tag pydantic inserts
                loc = loc[1:]
        key = ".".join(str(p) for p in loc)
        etype, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
        if etype == "extra_forbidden":
            msg = f"unknown key {key!r}"
        elif etype == "missing":
            msg = f"missing required key {key!r}"
        elif etype == "union_tag_invalid":
            msg = f"unknown kind {ctx.get('tag')!r}; expected one of {', '.join(KINDS)}"
        elif etype == "union_tag_not_found":
            msg = f"missing key 'kind' (one of {', '.join(KINDS)})"
        elif etype == "literal_error" and loc and loc[-1] == "metric":
            msg = f"unknown metric {value!r}; expected {ctx.get('expected')}"
        elif etype == "literal_error":
            msg = f"{key}: unknown value {value!r}; expected {ctx.get('expected')}"
        elif etype == "value_error":
            msg = (f"{key}: " if key else "") + str(ctx.get("error", err["msg"]))
        else:
            msg = f"{key}: {err['msg']} (got {value!r})" if key else err["msg"]
        lines.append(": ".join(p for p in (where, prefix, msg) if p))
    return "\n".join(lines)
