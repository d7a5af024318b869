"""Reading the YAML documents evomerge takes (recipes, search spaces, run configs), with safe_load only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml_mapping(source: str | Path, *, where: str, what: str, error: type[Exception]) -> dict[str, Any]:
    """The mapping in the YAML file ``source``; ``error(message)`` names ``where`` when the file is
    missing, is not valid YAML or does not hold a mapping (``what`` says which kind of document)."""
    path = Path(source)
    if not path.is_file():
        raise error(f"{where}: {what} file not found")
    return parse_yaml_mapping(path.read_text(), where=where, what=what, error=error)


def parse_yaml_mapping(text: str, *, where: str, what: str, error: type[Exception]) -> dict[str, Any]:
    """The mapping in YAML ``text`` (see ``read_yaml_mapping``)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{where}: malformed YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{where}: a {what} must be a mapping, got {type(data).__name__}")
    return data
