"""Loading a YAML config and turning validation errors into ``file:line: key: message`` lines.

Only PyYAML's ``SafeLoader`` is used (nothing in a config is ever evaluated as code), and its work is
bounded (:func:`read_yaml`): a hostile file ends in a message, never a hang or a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core.core_schema import ErrorType

from mft_plugin.config.axolotl_keys import dataset_key_problem
from mft_plugin.config.schema import DatasetSource, MFTConfigBase, config_model
from mft_plugin.registry import Registry, default_registry, suggestion


_PYDANTIC_ERROR_TYPES = frozenset(get_args(ErrorType))


class ConfigError(ValueError):
    """Every problem of a config at once, each naming its key path (and YAML line)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))


def parse_override(text: str, flag: str = "--set") -> tuple[list[str], Any]:
    """``objective.tau=0.5`` -> (["objective", "tau"], 0.5); the value is read as YAML.

    ``flag``: the option the text came from, named in the error (``--set`` or ``--grid``).
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"{flag} {text!r}: expected KEY=VALUE, e.g. {flag} objective.tau=0.5"])
    try:
        return key.strip().split("."), yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError([f"{flag} {text!r}: the value is not valid YAML ({problem})"]) from None


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set a dotted key, list items by index (``datasets.0.field``).

    ``objective: mft`` is widened to ``{name: mft}`` so that ``objective.tau`` can be set.
    """
    node: Any = data
    for i, part in enumerate(path):
        key = _override_key(node, part, ".".join(path), ".".join(path[:i]))
        if i == len(path) - 1:
            node[key] = value
            return
        child = node[key] if isinstance(node, list) else node.get(key)
        node[key] = {"name": child} if isinstance(child, str) else {} if child is None else child
        node = node[key]


def _override_key(node: Any, part: str, dotted: str, parent: str) -> str | int:
    """``part`` as a key of ``node``: a list index for a list; an error if ``node`` holds no keys."""
    if isinstance(node, dict):
        return part
    if not isinstance(node, list):
        raise ConfigError([f"--set {dotted}: {parent} is {node!r}, not a mapping"])
    if not (part.isdigit() and int(part) < len(node)):
        raise ConfigError([f"--set {dotted}: {parent} is a list of {len(node)}; {part!r} is not an index of it"])
    return int(part)


def _yaml_line(root: yaml.Node | None, path: tuple[Any, ...]) -> tuple[int | None, bool]:
    """1-based line of the deepest YAML node on ``path``, and whether all of ``path`` is in the YAML."""
    if root is None:
        return None, False
    node, line = root, root.start_mark.line + 1
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next((item for item in node.value if item[0].value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            match = (node.value[part], node.value[part])
        else:
            match = None
        if match is None:
            return line, False
        key_node, node = match
        line = key_node.start_mark.line + 1
    return line, True


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
    """The tag of a tagged-union member: a strategy's ``name``, a dataset entry's format ``type``."""
    for key in ("name", "type"):
        field = model.model_fields.get(key)
        if field is not None and get_origin(field.annotation) is Literal and len(get_args(field.annotation)) == 1:
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


def _data_path(loc: tuple[Any, ...], models: dict[tuple[str, ...], type[BaseModel]]) -> tuple[Any, ...]:
    """The YAML key path of a pydantic location: union tags (the ``mft`` in
    ``objective.mft.tau``) dropped, since they are values of ``name``, not keys."""
    path = []
    for i, part in enumerate(loc):
        model = models.get(tuple(p for p in loc[: i + 1] if isinstance(p, str)))
        if not (isinstance(part, str) and model is not None and _union_tag(model) == part):
            path.append(part)
    return tuple(path)


def _dataset_key_problem(key: str, entry: type[BaseModel], models: dict[tuple[str, ...], type[BaseModel]]) -> str | None:
    """An Axolotl dataset key in an entry whose format does not read it: which formats do, or why none does."""
    formats = {_union_tag(model): model for model in models.values() if issubclass(model, DatasetSource) and _union_tag(model)}
    readers = sorted(str(name) for name, model in formats.items() if key in model.model_fields)
    return dataset_key_problem(key, str(_union_tag(entry)), readers)


def _unknown_key(key: str, allowed: list[str]) -> str:
    """A did-you-mean, or the allowed keys when there are few (a strategy's parameters)."""
    hint = suggestion(key, allowed)
    if not hint and len(allowed) <= 8:
        hint = f"; allowed here: {', '.join(allowed)}"
    return f"unknown key{hint}"


def _describe(error: dict[str, Any], loc: tuple[Any, ...], models: dict[tuple[str, ...], type[BaseModel]]) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        parent = models.get(tuple(p for p in loc[:-1] if isinstance(p, str)))
        if parent is not None and issubclass(parent, DatasetSource) and (problem := _dataset_key_problem(str(loc[-1]), parent, models)):
            return problem
        return _unknown_key(str(loc[-1]), sorted(parent.model_fields) if parent else [])
    if error["type"] not in _PYDANTIC_ERROR_TYPES:  # ours (PydanticCustomError) already name the value
        return message
    got = error.get("input")
    if isinstance(got, (dict, list)) or got is None:
        return message
    return f"{message} (got {got!r})"


def _where(path: tuple[Any, ...], source: str, root: yaml.Node | None, overridden: set[str]) -> str:
    """``file:line`` of the key, or ``--set`` when the bad value came from an override."""
    dotted = ".".join(str(p) for p in path)
    line, in_yaml = _yaml_line(root, path)
    for key in overridden:
        if dotted == key or dotted.startswith(key + ".") or (key.startswith(dotted + ".") and not in_yaml):
            return "--set"
    return f"{source}:{line}" if line else source


def with_locations(problems: list[str], source: str | None, overrides: Sequence[str] = ()) -> list[str]:
    """Problems found after validation (``key: message``, e.g. by preflight) as ``file:line: key: message``."""
    if source is None:
        return problems
    _, root = read_yaml(source)
    overridden = {text.partition("=")[0].strip() for text in overrides}
    located = []
    for problem in problems:
        path = tuple(int(p) if p.isdigit() else p for p in problem.partition(": ")[0].split("."))
        located.append(f"{_where(path, source, root, overridden)}: {problem}")
    return located


def format_errors(
    error: ValidationError, model: type[BaseModel], source: str, root: yaml.Node | None, overridden: set[str]
) -> list[str]:
    models = _models_by_path(model)
    lines = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = _data_path(loc, models)
        dotted = ".".join(str(p) for p in path) or "(top level)"
        lines.append(f"{_where(path, source, root, overridden)}: {dotted}: {_describe(item, loc, models)}")
    return lines


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of keys; a bigger file is a mistake (or an attack)
MAX_NODES = 100_000  # YAML nodes once every alias is expanded: bounds a "billion laughs" file
MAX_DEPTH = 100  # nesting of mappings and lists


def read_yaml(path: str | Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """The config's data and its YAML node tree, or :class:`ConfigError`, with the work bounded.

    A hostile or broken file must end in a message, never a hang or a traceback: the size, the
    nesting depth and the alias-expanded node count are checked on the node tree before any Python
    object is built from it (PyYAML shares an alias's object, but every later walk would not).
    """
    text = _config_text(Path(path))
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters first (NUL, control characters)
        root = loader.get_single_node()
        if root is not None:
            _check_bounds(root, str(path))
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ConfigError([f"{where}: malformed YAML: {problem}"]) from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError([f"{path}: nested too deeply (more than {MAX_DEPTH} levels of mappings or lists)"]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"])
    duplicates = list(_duplicate_keys(root))
    if duplicates:
        raise ConfigError([f"{path}:{line}: {key}: {message}" for line, key, message in duplicates])
    return data, root


def _config_text(path: Path) -> str:
    """The file as text: refused when over :data:`MAX_CONFIG_BYTES` or not UTF-8."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: {size} bytes is too large for a config (at most {MAX_CONFIG_BYTES}); is it the right file?"])
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        byte = raw[error.start : error.start + 1].hex()
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte 0x{byte} at offset {error.start}); is it a binary file?"]) from None


def _check_bounds(root: yaml.Node, source: str) -> None:
    """Refuse a tree deeper than :data:`MAX_DEPTH` or expanding to more than :data:`MAX_NODES` nodes.

    Iterative, and each node is visited once (an alias is the same node object), so a billion-laughs
    file costs as many steps as it has distinct nodes, not as many as it expands to.
    """
    expanded: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, children_done = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError([f"{source}:{node.start_mark.line + 1}: nested too deeply (more than {MAX_DEPTH} levels of mappings or lists)"])
        children = _children(node)
        if children_done:
            # a child not yet counted is an ancestor: a recursive alias, which expands forever
            expanded[id(node)] = 1 + sum(expanded.get(id(child), MAX_NODES) for child in children)
            if expanded[id(node)] > MAX_NODES:
                raise ConfigError([
                    f"{source}:{node.start_mark.line + 1}: aliases expand to more than {MAX_NODES} YAML nodes "
                    "(a \"billion laughs\" file?); write the values out"
                ])
        elif id(node) not in expanded:
            stack.append((node, depth, True))
            stack.extend((child, depth + 1, False) for child in children if id(child) not in expanded)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _duplicate_keys(node: yaml.Node, prefix: str = "") -> Iterator[tuple[int, str, str]]:
    """A key given twice in one mapping (YAML keeps the last one silently): (line, dotted key, message)."""
    if isinstance(node, yaml.MappingNode):
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key_node.value in first_line:
                yield line, dotted, f"given twice (first on line {first_line[key_node.value]}); keep one"
            first_line.setdefault(key_node.value, line)
            yield from _duplicate_keys(value_node, dotted + ".")
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{prefix}{index}.")


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
    strict = data.get("strict") is True  # Axolotl's rule: overrides may only change keys the YAML gives
    for text in overrides or []:
        key_path, value = parse_override(text)
        if strict and key_path[0] not in data:
            raise ConfigError([f"--set {'.'.join(key_path)}: {path} has strict: true, so --set may only change its keys"])
        apply_override(data, key_path, value)
        overridden.add(".".join(key_path))
    return validate_config(data, registry, str(path), root, overridden)
