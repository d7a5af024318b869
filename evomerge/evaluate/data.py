"""Task data: JSONL reading, prompt templates, deterministic splits and the split-overlap check.

Everything here is plain Python on strings; nothing touches a model or a tokenizer. Errors are
`TaskError`s that name the file and line, raised while the task file is loaded (before any model runs).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

SPLITS = ("search", "validation", "test")  # the evaluation splits
TRAIN = "train"  # an optional fourth split of native tasks: training examples (``evomerge finetune``), never scored


class TaskError(ValueError):
    """A task file or its data is invalid; the message names the file, key and line."""


@dataclass(frozen=True)
class Example:
    """One rendered example: the prompt, its scored continuation(s) and where it came from.

    multiple_choice: `continuations` holds every rendered choice and `label` the gold index;
    generate / loglikelihood: `continuations` holds the single rendered target.
    """

    prompt: str
    continuations: tuple[str, ...]
    label: int = 0
    source: str = ""  # "path:line"

    @property
    def target(self) -> str:
        """The expected completion (generate) or scored continuation (loglikelihood)."""
        return self.continuations[0]


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSONL file with their 1-based line numbers (blank lines skipped)."""
    if not path.is_file():
        raise TaskError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise TaskError(f"{path}: no examples (the file is empty)")
    return rows


def template_fields(template: str) -> set[str]:
    """The top-level field names a str.format template reads, e.g. "{a[0]} {b.c}" -> {"a", "b"}.

    Raises ValueError for malformed templates, positional fields and dunder access.
    """
    fields = set()
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        root = field.split(".", 1)[0].split("[", 1)[0]
        if not root or root.isdigit():
            raise ValueError(f"positional field {{{field}}} in template {template!r}; use named fields like {{question}}")
        if "__" in field:
            raise ValueError(f"field {{{field}}} in template {template!r} may not use dunder access")
        fields.add(root)
    return fields


def render(template: str, values: Mapping[str, Any], *, key: str, source: str) -> str:
    """`template` formatted with `values`; a missing field is a TaskError naming the line and key."""
    missing = sorted(template_fields(template) - set(values))
    if missing:
        have = ", ".join(sorted(values)) or "none"
        raise TaskError(f"{source}: field {missing[0]!r} used by the `{key}` template is missing (the line has: {have})")
    try:
        return template.format_map(values)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as exc:
        raise TaskError(f"{source}: cannot render the `{key}` template {template!r}: {exc!r}") from None


def render_multiple_choice(
    row: Mapping[str, Any], *, prompt: str, choice: str, choices_field: str, label_field: str, source: str
) -> Example:
    """A multiple-choice Example: each entry of `row[choices_field]` rendered through `choice`."""
    choices = row.get(choices_field)
    if not isinstance(choices, list) or not choices:
        raise TaskError(f"{source}: `{choices_field}` (choices_field) must be a non-empty list, got {choices!r}")
    label = row.get(label_field)
    if isinstance(label, bool) or not isinstance(label, int):
        raise TaskError(f"{source}: `{label_field}` (label_field) must be an integer index, got {label!r}")
    if not 0 <= label < len(choices):
        raise TaskError(f"{source}: label {label} is out of range for {len(choices)} choices")
    conts = tuple(render(choice, {**row, "choice": c}, key="choice", source=source) for c in choices)
    if not all(conts):
        raise TaskError(f"{source}: a choice renders to an empty continuation")
    return Example(render(prompt, row, key="prompt", source=source), conts, label, source)


def render_target(row: Mapping[str, Any], *, prompt: str, target: str, source: str) -> Example:
    """A generate / loglikelihood Example: the prompt and the rendered target."""
    text = render(target, row, key="target", source=source)
    if not text:
        raise TaskError(f"{source}: the `target` template renders to an empty string")
    return Example(render(prompt, row, key="prompt", source=source), (text,), 0, source)


def split_indices(n: int, fractions: Sequence[float], seed: int, *, what: str) -> dict[str, list[int]]:
    """Disjoint search/validation/test index lists covering range(n), from a seeded permutation.

    Sizes are round(f*n) for search and validation, the rest for test; each list is sorted.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_search = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    bounds = {"search": (0, n_search), "validation": (n_search, n_search + n_val), "test": (n_search + n_val, n)}
    out = {}
    for name, (lo, hi) in bounds.items():
        if hi <= lo:
            raise TaskError(
                f"{what}: split {name!r} is empty ({n} examples with fractions "
                f"search {fractions[0]}, validation {fractions[1]}, test {fractions[2]}); add examples or change the fractions"
            )
        out[name] = sorted(int(i) for i in perm[lo:hi])
    return out


def example_key(example: Example) -> tuple:
    """What makes two examples identical: the rendered prompt, continuations and label."""
    return (example.prompt, example.continuations, example.label)


def check_disjoint(splits: Mapping[str, Iterable[Example]], *, key=example_key, where=lambda e: e.source) -> None:
    """Raise a TaskError naming both places if an identical example occurs in two different splits."""
    seen: dict[Any, tuple[str, Any]] = {}
    for split, examples in splits.items():
        for ex in examples:
            k = key(ex)
            first = seen.setdefault(k, (split, ex))
            if first[0] != split:
                raise TaskError(
                    f"splits overlap: {where(first[1])} ({first[0]}) and {where(ex)} ({split}) hold the same example"
                )


def read_split_file(path: Path, render_row) -> list[Example]:
    """Every line of a JSONL file rendered into an Example with its "path:line" source."""
    return [render_row(row, f"{path}:{lineno}") for lineno, row in read_jsonl(path)]
