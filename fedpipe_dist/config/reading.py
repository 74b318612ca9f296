"""Reading a job: YAML job files and dotted overrides, built into the section dataclasses with typed coercion,
every unknown key or wrong value named (all of them gathered in one ConfigError)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..errors import ConfigError
from .jobconfig import JobConfig
from .sections import MAX_SYNTHETIC  # noqa: F401 (config.MAX_SYNTHETIC)

# --------------------------------------------------------------------------------------------------
# Building dataclasses from nested dicts, with typed coercion and helpful unknown-key errors


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# YAML 1.1 (PyYAML) reads 1e3 or 2e-4 (no dot in the mantissa) as strings, not numbers.
_SCI_INT = re.compile(r"^[+-]?\d+(\.\d*)?[eE][+-]?\d+$")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        msg = errors[-1] if errors else f"{key}: bad value {value!r}"
        if type(None) in args:
            msg += "; or null for the default behaviour"
        raise ConfigError(msg, key=key)
    if origin is Literal:
        if value not in args:
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}{extra}", key=key)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list such as [a, b] (got {value!r}); write it as "
                              f"{key}=[a, b]", key=key)
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            names = [f.name for f in dataclasses.fields(tp) if f.init]
            raise ConfigError(f"{key}: is a group of settings, not a value (got {value!r}); set its keys "
                              f"instead, e.g. {key}.{names[0]}=..., choosing from {names}", key=key)
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false (got {value!r}); set {key}=true or {key}=false",
                          key=key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _SCI_INT.match(value.strip()) and float(value).is_integer():
            return int(float(value))
        raise ConfigError(f"{key}: expected an integer (got {value!r}); set it to a whole number such as 8",
                          key=key)
    if tp is float:
        num = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            num = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads '2e-4' as a string
            try:
                num = float(value)
            except ValueError:
                pass
        if num is None:
            raise ConfigError(f"{key}: expected a number (got {value!r}); set it to a number such as 0.5 or "
                              "1e-3", key=key)
        if not math.isfinite(num):
            raise ConfigError(f"{key}: must be a finite number (got {value!r}); set it to a number such as "
                              "0.5", key=key)
        return num
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            raise ConfigError(f"{key}: is empty; set it to a text value (write {key}=VALUE with no space "
                              "around '=')", key=key)
        if isinstance(value, int) and not isinstance(value, bool):  # a folder named 2024 is still a name
            return str(value)
        leaf = key.rsplit(".", 1)[-1]
        raise ConfigError(f"{key}: expected text (got {value!r}); quote it so YAML reads it as text: "
                          f"{leaf}: '{value}' in a job file, \"{key}='{value}'\" on the command line",
                          key=key)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # a bug in this file, not the job


def _all_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the job (e.g. 'train.lr'), for suggestions across groups."""
    cls = cls or JobConfig
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(_all_keys(hints[f.name], prefix + f.name + "."))
    return out


def _suggest(name: str, names: list[str], prefix: str) -> list[str]:
    """Likely intended dotted keys for an unknown key `prefix + name`."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    if close:  # a typo of a key in the same group (train.lrr -> train.lr)
        return [prefix + close[0]]
    everywhere = _all_keys()
    same_leaf = [k for k in everywhere if k.rsplit(".", 1)[-1] == name and k != prefix + name]
    if same_leaf:  # the right key in the wrong group (lr -> train.lr)
        return same_leaf[:3]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return [prefix + close[0]]
    leaves = {k.rsplit(".", 1)[-1]: k for k in everywhere}
    close = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.8)
    return [leaves[close[0]]] if close else []


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs, problems = {}, []
    for k, v in data.items():  # every wrong key and value, not only the first
        if k not in names:
            close = _suggest(str(k), names, prefix)
            hint = ("did you mean " + " or ".join(f"'{c}'" for c in close) + "? ") if close else ""
            problems.append(ConfigError(f"unknown key '{prefix}{k}': {hint}valid keys here are {names}",
                                        key=f"{prefix}{k}"))
            continue
        try:
            kwargs[k] = _coerce(v, hints[k], prefix + k)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError.gathered(problems)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"{prefix or 'job'}: {e}") from None


def _split_override(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value (e.g. train.lr=1e-3)")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r}: empty key; write it as dotted.key=value")
    return key, raw


def apply_override(tree: dict, override: str) -> None:
    """Apply one `dotted.key=value` override (value parsed as YAML) to a nested dict in place."""
    key, raw = _split_override(override)
    try:
        value = safe_yaml(raw, f"override {key}") if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e.__class__.__name__}); "
                          "quote strings and write lists as [a, b]", key=key) from None
    node = tree
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p not in node or node[p] is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            group = ".".join(parts[: i + 1])
            raise ConfigError(f"override {key}: '{group}' is a value, not a group of keys; set it directly "
                              f"as {group}=VALUE", key=group)
        node = node[p]
    node[parts[-1]] = value


def _yaml_error_hint(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return (f"{problem}{where}. Fix the syntax there: indent nested keys with spaces (not tabs), write "
            "'key: value' with a space after ':', and quote text that contains ':' or '#'")


MAX_JOB_BYTES = 1 << 20  # a job file is a page of settings; a megabyte is far beyond any real one
MAX_YAML_NODES = 100_000  # after alias expansion: a "billion laughs" file is a few hundred bytes


def safe_yaml(text: str, where: str):
    """yaml.safe_load with bounds checked first: the text's size and the node count after alias expansion
    (aliases are shared while loading, but anything that walks the result, such as building an error
    message, pays for every expanded node). ConfigError names `where`; YAML errors pass through."""
    if len(text) > MAX_JOB_BYTES:
        raise ConfigError(f"{where} is {len(text):,} characters; a job holds at most {MAX_JOB_BYTES:,} (is it the "
                          "right file?)")
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    sizes: dict[int, int] = {}

    def size(n) -> int:  # expanded node count, each shared (aliased) node computed once
        if id(n) in sizes:
            return sizes[id(n)]
        sizes[id(n)] = 1  # a node that contains itself (a recursive alias) counts once
        children = [x for kv in n.value for x in kv] if isinstance(n, yaml.MappingNode) else \
            n.value if isinstance(n, yaml.SequenceNode) else []
        total = 1
        for c in children:
            total += size(c)
            if total > MAX_YAML_NODES:
                break
        sizes[id(n)] = total
        return total

    try:
        expanded = size(node) if node is not None else 0
    except RecursionError:
        raise ConfigError(f"{where} nests its values too deeply; write it as plain key: value lines") from None
    if expanded > MAX_YAML_NODES:
        raise ConfigError(f"{where} expands to more than {MAX_YAML_NODES:,} values through its aliases (*name); "
                          "a job file needs none: write the values out")
    return yaml.safe_load(text)


def read_job(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), check=None) -> JobConfig:
    """Read a YAML job file (or start from defaults when path is None) and apply overrides; every section is
    checked (validate), then `check(cfg)`, and a ConfigError says whether the file or an override set the key.
    Load jobs with fedpipe_dist.job.load_job, which passes the job's method's own checks as `check`."""
    tree: dict = {}
    file_tree: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"job file {str(p)!r} is a folder; pass a YAML file such as "
                              "jobs/quickstart.yaml")
        if not p.is_file():
            raise ConfigError(f"job file {str(p)!r} does not exist; pass a YAML file such as "
                              "jobs/quickstart.yaml")
        if p.stat().st_size > MAX_JOB_BYTES:
            raise ConfigError(f"job file {str(p)!r} is {p.stat().st_size:,} bytes; a job file holds at most "
                              f"{MAX_JOB_BYTES:,} (is it the right file?)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"job file {str(p)!r} is not UTF-8 text; save it as UTF-8 YAML") from None
        except OSError as e:
            raise ConfigError(f"job file {str(p)!r} cannot be read ({e.strerror}); check its "
                              "permissions") from None
        try:
            loaded = safe_yaml(text, f"job file {str(p)!r}")
        except yaml.YAMLError as e:
            raise ConfigError(f"job file {str(p)!r} is not valid YAML: {_yaml_error_hint(e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"job file {str(p)!r} must hold a mapping of keys at the top (got "
                              f"{type(loaded).__name__}); write it as 'key: value' lines, e.g. 'rounds: 10'")
        tree = loaded
        file_tree = copy.deepcopy(loaded)
    problems = []
    for o in overrides:
        try:
            apply_override(tree, o)
        except ConfigError as e:
            problems.append(e)
    cfg = None
    try:
        cfg = _build(JobConfig, tree)
        if check is not None and not problems:
            check(cfg)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:  # each with where its key was set
        placed = [ConfigError(f"{p}{_origin(p.key, path, file_tree, overrides)}", key=p.key) for p in problems]
        raise ConfigError.gathered(placed) from None
    return cfg


def _origin(key: str | None, path: str | Path | None, file_tree: dict, overrides) -> str:
    """' (from the override ...)' or ' (in job file ...)': where the offending key was set, if known."""
    if not key:
        return ""
    base = key.split("[", 1)[0]
    for o in reversed(list(overrides)):
        okey = o.split("=", 1)[0].strip()
        if okey == base or okey.startswith(base + ".") or base.startswith(okey + "."):
            return f" (from the override {o!r})"
    node: Any = file_tree
    for part in base.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    return f" (in job file {str(path)!r})"


def build_job(tree: dict) -> JobConfig:
    """A JobConfig from its to_dict() form, every section checked (fedpipe_dist.job.job_from_dict adds the
    method's own checks)."""
    return _build(JobConfig, tree)
