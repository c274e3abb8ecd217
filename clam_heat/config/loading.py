"""Reading YAML configs: every problem collected with its file line, overrides, search."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from ..errors import ConfigError
from .fields import (
    CONFIG_SEARCH_DIRS,
    _KeyProblem,
    _label_dict_rule,
    _norm,
    _num,
    _unknown,
)
from .schema import (
    BLOCK_NAMES,
    BLOCKS,
    CLAM_BLOCK_NAMES,
    DataArguments,
    ExpArguments,
    HeatmapConfig,
    SampleSpec,
)

# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Origin:
    """Where a value came from: a YAML line or a command-line override."""

    text: str
    order: tuple[int, int, int]
    key: tuple[str | int, ...] = ()
    override: bool = False


class _Problems:
    """Collects problems (deduplicated, sorted by where they come from) for one ConfigError."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.origins: dict[tuple[str | int, ...], _Origin] = {(): _Origin(source, (0, 0, 0))}
        self._items: list[tuple[tuple[int, int, int], str]] = []

    def origin(self, loc: tuple[str | int, ...]) -> _Origin:
        for cut in range(len(loc), -1, -1):
            found = self.origins.get(loc[:cut])
            if found is not None:
                return found
        return self.origins[()]

    def add(self, loc: tuple[str | int, ...], rule: str, value: Any = ...) -> None:
        where = self.origin(loc)
        shown = "" if value is ... else f" = {_show(value)}"
        if where.override and loc == where.key:
            text = f"{where.text}: {rule}"
        elif where.override:
            text = f"{where.text}: {_dotted(loc)}{shown}: {rule}"
        else:
            text = " ".join(filter(None, [where.text, _dotted(loc) + shown])) + f": {rule}"
        self.add_text(where.order, text)

    def add_text(self, order: tuple[int, int, int], text: str) -> None:
        if all(text != existing for _, existing in self._items):
            self._items.append((order, text))

    def __bool__(self) -> bool:
        return bool(self._items)

    def error(self, source_path: Path | None) -> ConfigError:
        ordered = [text for _, text in sorted(self._items, key=lambda item: item[0])]
        err = ConfigError(ordered)  # each line already names the file
        err.source = source_path if source_path is not None else self.source
        return err


def _dotted(loc: tuple[str | int, ...]) -> str:
    """``('sample_arguments', 'samples', 0, 'k')`` -> ``sample_arguments.samples[0].k``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":
            out += f".{part}" if out else str(part)
    return out


def _flag_value(text: str) -> str:
    """A command-line value as typed, or ``repr``-escaped and cut when it would break or flood
    a one-line message (a newline, a control character, hundreds of characters)."""
    if len(text) <= 80 and not any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        return text
    return _show(text)


def _show(value: Any) -> str:
    text = repr(value.as_posix() if isinstance(value, Path) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _allowed_keys(parent: tuple[str | int, ...]) -> tuple[str, ...]:
    names = tuple(part for part in parent if isinstance(part, str))
    if names == ("sample_arguments", "samples"):
        return tuple(SampleSpec.model_fields)
    if len(names) == 1 and names[0] in BLOCKS:
        return tuple(BLOCKS[names[0]].model_fields)
    return BLOCK_NAMES


_TYPE_RULES = {
    "missing": "missing required key",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "dict_type": "must be a mapping of keys to values",
    "model_type": "must be a mapping of keys to values",
    "model_attributes_type": "must be a mapping of keys to values",
    "list_type": "must be a list",
}
_BOUND_RULES = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">"}
_BOUND_RULES["less_than"] = "<"
_BOUND_KEYS = {"greater_than_equal": "ge", "less_than_equal": "le", "greater_than": "gt"}
_BOUND_KEYS["less_than"] = "lt"


def _add_validation_errors(problems: _Problems, error: ValidationError) -> None:
    """Turn pydantic's errors into our one-line problems (key path, value, rule)."""
    for item in error.errors():
        loc = tuple(item["loc"])
        kind = item["type"]
        ctx = item.get("ctx") or {}
        value: Any = item.get("input")
        cause = ctx.get("error")
        if isinstance(cause, _KeyProblem):
            loc += cause.key
            rule = cause.rule
            if cause.value is not ...:
                value = cause.value
        elif kind == "extra_forbidden":
            rule = _unknown("key", str(loc[-1]), _allowed_keys(loc[:-1]))
            value = ...
        elif kind in _BOUND_RULES:
            rule = f"must be {_BOUND_RULES[kind]} {_num(ctx[_BOUND_KEYS[kind]])}"
        elif kind == "literal_error":
            rule = f"must be one of {ctx['expected']}"
        elif kind in _TYPE_RULES:
            rule = _TYPE_RULES[kind]
        else:
            message = str(item["msg"])
            rule = message[:1].lower() + message[1:]
        if kind == "missing":
            value = ...
        if loc and loc[-1] == "[key]":
            rule = "key " + rule
        problems.add(loc, rule, value)


def _record_lines(
    node: yaml.Node,
    loc: tuple[str | int, ...],
    loader: yaml.SafeLoader,
    problems: _Problems,
    name: str,
) -> None:
    """Map every key path of the YAML tree to ``name:line`` (1-based)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            try:
                key = loader.construct_object(key_node, deep=True)
            except yaml.YAMLError:
                continue
            if not isinstance(key, str | int) or isinstance(key, bool):
                key = str(key)
            mark = key_node.start_mark
            order = (0, mark.line + 1, mark.column)
            problems.origins[loc + (key,)] = _Origin(f"{name}:{mark.line + 1}", order)
            _record_lines(value_node, loc + (key,), loader, problems, name)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            mark = item.start_mark
            order = (0, mark.line + 1, mark.column)
            problems.origins[loc + (index,)] = _Origin(f"{name}:{mark.line + 1}", order)
            _record_lines(item, loc + (index,), loader, problems, name)


#: The most values a config may expand to through aliases (a real config has a few hundred):
#: a "billion laughs" of nested aliases is refused before it is expanded.
MAX_YAML_VALUES = 10_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_tree(root: yaml.Node, problems: _Problems, name: str) -> bool:
    """Walk the document as aliases expand it; True when it is safe to construct.

    Refuses (one problem each, with the line) a recursive alias, an expansion beyond
    :data:`MAX_YAML_VALUES` values (stopping there, so it takes milliseconds) and a key given
    twice in one mapping (both lines: YAML would silently keep the last).
    """
    seen = 0
    stack: list[tuple[yaml.Node, tuple[str, ...], frozenset[int]]] = [(root, (), frozenset())]
    ok = True
    checked: set[int] = set()
    while stack:
        node, path, ancestors = stack.pop()
        seen += 1
        line = node.start_mark.line + 1
        if seen > MAX_YAML_VALUES:
            problems.add_text(
                (0, line, 0),
                f"{name}:{line}: aliases expand to more than {MAX_YAML_VALUES} values; write "
                "the values out instead of nesting aliases",
            )
            return False
        if id(node) in ancestors:
            problems.add_text(
                (0, line, 0), f"{name}:{line}: recursive alias (a value contains itself); remove it"
            )
            return False
        inner = ancestors | {id(node)}
        if isinstance(node, yaml.MappingNode):
            if id(node) not in checked:  # an aliased mapping is reported once
                checked.add(id(node))
                ok = _check_duplicate_keys(node, path, problems, name) and ok
            for key_node, value_node in node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                stack.append((value_node, (*path, key), inner))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                stack.append((item, (*path[:-1], f"{path[-1] if path else ''}[{index}]"), inner))
    return ok


def _check_duplicate_keys(
    node: yaml.MappingNode, path: tuple[str, ...], problems: _Problems, name: str
) -> bool:
    """One problem per key given twice in ``node`` (a second block is a duplicate key too)."""
    first: dict[tuple[str, str], int] = {}
    ok = True
    for key_node, _value in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        line = key_node.start_mark.line + 1
        key = (key_node.tag, key_node.value)
        if key not in first:
            first[key] = line
            continue
        dotted = ".".join((*path, str(key_node.value)))
        what = "block" if not path else "key"
        problems.add_text(
            (0, line, 0),
            f"{name}:{first[key]} and :{line} {dotted} given twice (YAML would keep only the "
            f"last); keep one {what}",
        )
        ok = False
    return ok


def _parse_yaml(text: str, problems: _Problems, name: str) -> Any:
    """safe_load the text and record the line of every key; YAML errors become problems.

    Aliases are checked before anything is built from them (see :func:`_check_tree`).
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if not _check_tree(node, problems, name):
            return None
        data = loader.construct_document(node)
        _record_lines(node, (), loader, problems, name)
        return data
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = mark.line + 1 if mark is not None else 0
        parts = [getattr(err, "context", None), getattr(err, "problem", None)]
        what = ", ".join(part for part in parts if part) or str(err).splitlines()[0]
        problems.add_text((0, line, 0), f"{name}:{line} invalid YAML: {what}")
        return None
    except RecursionError:
        problems.add_text((0, 0, 0), f"{name}: nested too deeply to read; flatten the config")
        return None
    finally:
        loader.dispose()


def _set_override(
    data: dict[str, Any],
    problems: _Problems,
    loc: tuple[str, str],
    value: Any,
    text: str,
    order: int,
) -> None:
    """Put an override into the raw data and remember that errors there belong to it."""
    block, key = loc
    current = data.get(block)
    if current is None:
        current = {}
    if not isinstance(current, dict):
        return  # the block itself is reported as "must be a mapping"
    data[block] = {**current, key: value}
    for known in [k for k in problems.origins if k[:2] == loc]:
        del problems.origins[known]
    problems.origins[loc] = _Origin(text, (1, order, 0), loc, override=True)


def _apply_set(data: dict[str, Any], problems: _Problems, spec: str, order: int) -> None:
    """Apply one generic ``BLOCK.KEY=VALUE`` override (the value is parsed as YAML)."""
    where = f"--set {_flag_value(spec)}"
    path, sep, raw = spec.partition("=")
    parts = path.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        problems.add_text(
            (1, order, 0), f"{where}: expected BLOCK.KEY=VALUE (e.g. heatmap_arguments.alpha=0.5)"
        )
        return
    block, key = parts
    if block not in BLOCKS:
        problems.add_text((1, order, 0), f"{where}: " + _unknown("block", block, BLOCK_NAMES))
        return
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        problems.add_text((1, order, 0), f"{where}: the value is not valid YAML")
        return
    _set_override(data, problems, (block, key), value, where, order)


def _build(
    data: Any,
    problems: _Problems,
    *,
    base_dir: Path,
    source_path: Path | None,
    overrides: Sequence[str] = (),
    save_exp_code: str | None = None,
    overlap: float | None = None,
) -> HeatmapConfig:
    """Validate raw YAML data (plus overrides) into a HeatmapConfig or raise every problem."""
    if not problems and not isinstance(data, dict):
        if data is None:
            problems.add_text((0, 0, 0), f"{problems.source}: the config is empty")
        else:
            problems.add_text(
                (0, 1, 0),
                f"{problems.source}: must be a mapping of blocks "
                f"({', '.join(CLAM_BLOCK_NAMES)}), got {type(data).__name__}",
            )
    if problems:
        raise problems.error(source_path)
    assert isinstance(data, dict)
    raw: dict[str, Any] = {}
    for key, value in data.items():
        if key in BLOCKS:
            raw[key] = value
        else:
            problems.add((key,), _unknown("block", str(key), BLOCK_NAMES))

    for order, spec in enumerate(overrides):
        _apply_set(raw, problems, spec, order)
    if save_exp_code is not None:
        text = f"--save_exp_code {_flag_value(save_exp_code)}"
        _set_override(raw, problems, ("exp_arguments", "save_exp_code"), save_exp_code, text, 90)
    if overlap is not None:
        text = f"--overlap {overlap}"
        _set_override(raw, problems, ("patching_arguments", "overlap"), overlap, text, 91)
    for name in BLOCK_NAMES:
        raw.setdefault(name, {})  # validate every block with the path context

    context = {"base_dir": base_dir, "cwd": Path.cwd()}
    config: HeatmapConfig | None = None
    try:
        config = HeatmapConfig.model_validate({**raw, "source_path": source_path}, context=context)
    except ValidationError as err:
        _add_validation_errors(problems, err)
        _cross_check_raw(raw, problems, context)
    if problems or config is None:
        raise problems.error(source_path)
    config._base_dir = base_dir
    return config


def _cross_check_raw(raw: dict[str, Any], problems: _Problems, context: dict[str, Any]) -> None:
    """Check label_dict against n_classes even when other keys failed (report everything)."""
    try:
        exp, data = raw.get("exp_arguments") or {}, raw.get("data_arguments") or {}
        n_classes = ExpArguments.model_validate(
            {"n_classes": exp["n_classes"]} if "n_classes" in exp else {}, context=context
        ).n_classes
        labels = DataArguments.model_validate(
            {"label_dict": data["label_dict"]} if "label_dict" in data else {}, context=context
        ).label_dict
    except (ValidationError, TypeError, AttributeError):
        return
    rule = _label_dict_rule(n_classes, labels)
    if rule:
        problems.add(("data_arguments", "label_dict"), rule, labels)


def find_config(name_or_path: str | Path) -> Path:
    """Find a config file: the path as given, else under ``configs/`` or ``heatmaps/configs/``.

    Relative names are looked up under the CWD (CLAM joins ``heatmaps/configs`` with the name);
    a name without a suffix also matches ``<name>.yaml`` / ``<name>.yml``.
    Raises ConfigError when nothing matches.
    """
    given = Path(name_or_path).expanduser()
    names = [given]
    if not given.suffix:
        names += [given.with_name(given.name + ".yaml"), given.with_name(given.name + ".yml")]
    if given.is_absolute():
        candidates = names
    else:
        candidates = [Path.cwd() / folder / name for folder in CONFIG_SEARCH_DIRS for name in names]
    for candidate in candidates:
        if candidate.is_file():
            return _norm(candidate.absolute())
    if given.is_absolute():
        where = "(no such file)"
    else:
        where = f"(looked in {', '.join(d + '/' for d in CONFIG_SEARCH_DIRS)} under {Path.cwd()})"
    raise ConfigError(f"config '{name_or_path}' not found {where}")


def load_config(
    path: str | Path,
    *,
    overrides: Sequence[str] = (),
    save_exp_code: str | None = None,
    overlap: float | None = None,
) -> HeatmapConfig:
    """Load, override and check a heatmap YAML config.

    ``save_exp_code`` / ``overlap`` are CLAM's two CLI overrides; ``overrides`` holds generic
    ``BLOCK.KEY=VALUE`` settings (value parsed as YAML), applied first, in order.
    Raises ConfigError (exit code 2) listing every problem found.
    """
    found = find_config(path)
    name = found.name
    try:
        text = found.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{name}: cannot read the config ({err})", found) from None
    problems = _Problems(name)
    data = _parse_yaml(text, problems, name)
    return _build(
        data,
        problems,
        base_dir=found.parent,
        source_path=found,
        overrides=overrides,
        save_exp_code=save_exp_code,
        overlap=overlap,
    )


def config_from_dict(
    data: dict[str, Any],
    *,
    base_dir: Path | None = None,
    source: str = "<dict>",
    overrides: Sequence[str] = (),
    flag_values: Sequence[tuple[str, str, Any, str]] = (),
) -> HeatmapConfig:
    """Check a config given as a dict (as ``yaml.safe_load`` would return it).

    Relative paths resolve against ``base_dir`` if they exist there, else the CWD; problems are
    named ``<source> key.path = value: rule``. ``overrides`` are ``--set`` strings, as for
    :func:`load_config`; ``flag_values`` are ``(block, key, value, flag text)`` settings made by
    command-line flags, whose problems are reported against the flag (``--model-type x: ...``).
    """
    problems = _Problems(source)
    base = Path(base_dir).absolute() if base_dir is not None else Path.cwd()
    raw = dict(data) if isinstance(data, Mapping) else data
    if isinstance(raw, dict):
        for order, (block, key, value, text) in enumerate(flag_values):
            _set_override(raw, problems, (block, key), value, text, 80 + order)
    return _build(raw, problems, base_dir=base, source_path=None, overrides=overrides)
