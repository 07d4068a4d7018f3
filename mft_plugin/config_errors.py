"""Loading a YAML config and turning validation errors into ``file:line: key: message`` lines.

Only ``yaml.safe_load``/``yaml.compose`` are used: nothing in a config is ever evaluated as code.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from mft_plugin.config import MFTConfigBase, config_model
from mft_plugin.registry import Registry, default_registry


class ConfigError(ValueError):
    """Every problem of a config at once, each naming its key path (and YAML line)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))


def suggestion(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``objective.tau=0.5`` -> (["objective", "tau"], 0.5); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text!r}: expected KEY=VALUE, e.g. --set objective.tau=0.5"])
    return key.strip().split("."), yaml.safe_load(raw)


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set a dotted key; ``objective: mft`` is widened to ``{name: mft}`` to take a parameter."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if isinstance(child, str):
            child = {"name": child}
        if child is None:
            child = {}
        if isinstance(node, list) or not isinstance(child, (dict, list)):
            raise ConfigError([f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a mapping"])
        node[part] = child
        node = child
    if isinstance(node, list):
        index = int(path[-1])
        node[index] = value
    else:
        node[path[-1]] = value


def _yaml_line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node that ``loc`` reaches (tags of unions are skipped)."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((item for item in node.value if item[0].value == part), None)
            if match is None:
                continue  # a union tag such as 'mft' in ('objective', 'mft', 'tau')
            key_node, node = match
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
    return line


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    origin = get_origin(annotation)
    if origin is Annotated:
        yield from _models_in(get_args(annotation)[0])
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    elif origin is not None:
        for arg in get_args(annotation):
            yield from _models_in(arg)


def _union_tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("name")
    if field is not None and get_origin(field.annotation) is Literal:
        return get_args(field.annotation)[0]
    return None


def _models_by_path(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], type[BaseModel]]:
    """Every nested model keyed by its location as pydantic reports it (list indices dropped)."""
    index = {prefix: model}
    for key, field in model.model_fields.items():
        for sub in _models_in(field.annotation):
            tag = _union_tag(sub)
            index.update(_models_by_path(sub, prefix + ((key, tag) if tag else (key,))))
    return index


def _describe(error: dict[str, Any], models: dict[tuple[str, ...], type[BaseModel]]) -> str:
    loc = error["loc"]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        parent = models.get(tuple(p for p in loc[:-1] if isinstance(p, str)))
        allowed = sorted(parent.model_fields) if parent else []
        return f"unknown key{suggestion(str(loc[-1]), allowed)}"
    if error["type"] in ("unknown_strategy", "incompatible_mitigations", "file_missing", "file_empty", "missing_field"):
        return message
    got = error.get("input")
    if isinstance(got, (dict, list)) or got is None:
        return message
    return f"{message} (got {got!r})"


def format_errors(
    error: ValidationError, model: type[BaseModel], source: str, root: yaml.Node | None, overridden: set[str]
) -> list[str]:
    models = _models_by_path(model)
    lines = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if any(dotted == key or dotted.startswith(key + ".") for key in overridden):
            where = "--set"
        else:
            line = _yaml_line(root, loc)
            where = f"{source}:{line}" if line else source
        lines.append(f"{where}: {dotted}: {_describe(item, models)}")
    return lines


def read_yaml(path: str | Path) -> tuple[dict[str, Any], yaml.Node | None]:
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: malformed YAML: {getattr(error, 'problem', None) or error}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"])
    return data, root


def validate_config(
    data: dict[str, Any],
    registry: Registry | None = None,
    source: str = "<config>",
    root: yaml.Node | None = None,
    overridden: set[str] | None = None,
) -> MFTConfigBase:
    model = config_model(registry or default_registry())
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_errors(error, model, source, root, overridden or set())) from None


def load_config(
    path: str | Path, overrides: list[str] | None = None, registry: Registry | None = None
) -> MFTConfigBase:
    """Read, override (``--set key=value``) and validate a YAML config; raise :class:`ConfigError`."""
    if not Path(path).is_file():
        raise ConfigError([f"{path}: config file not found"])
    data, root = read_yaml(path)
    overridden = set()
    for text in overrides or []:
        key_path, value = parse_override(text)
        apply_override(data, key_path, value)
        overridden.add(".".join(key_path))
    return validate_config(data, registry, str(path), root, overridden)
