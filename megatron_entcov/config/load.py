"""Reading and writing config files: YAML with ``base:`` files, ``--set dotted.key=value`` overrides, the typed
dict -> dataclass build (unknown keys, wrong types, non-finite floats and moved keys fail naming the field), the
fields filled from ``model.hf_dir``'s config.json, and the resolved dump written into the run directory.

YAML is read strictly: a key twice in one mapping, nesting deeper than ``MAX_YAML_DEPTH`` and aliases expanding
past ``MAX_YAML_NODES`` values fail, and every error is one line whose quoted values are shortened (``shorten``).

Example:
    cfg = load_config("configs/quickstart.yaml", overrides=["loss.name=kl_cov", "optim.lr=1e-5"])
    cfg.resolve(world_size=4)
    dump_config(cfg, run_dir / "resolved_config.yaml")      # loads back to an equal config

Design notes: docs/design/config.md
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_entcov.config.checks import check_choice, shorten
from megatron_entcov.config.schema import ModelConfig, RunConfig

__all__ = ["load_config", "config_from_dict", "config_to_dict", "apply_overrides", "dump_config",
           "source_revision", "shorten", "MOVED_KEYS", "NON_FINITE_FLOAT_FIELDS", "MAX_YAML_DEPTH", "MAX_YAML_NODES"]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; convert int -> float where a float is expected."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{path}={shorten(value)} has the wrong type: expected {_type_name(tp)}"
                         f"{_quote_hint(path, value, tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("off" if value is False else "on") in choices:
            value = "off" if value is False else "on"       # YAML 1.1 reads an unquoted off/on as a boolean
        check_choice(path, value, choices)
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{path}={shorten(value)} has the wrong type: expected a list of "
                             f"{_type_name(item_tp)}")
        return [_coerce(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{path}={shorten(value)} has the wrong type: expected a mapping for {tp.__name__}")
        return _build(tp, value, path)
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where "1e-6" (no dot) is a string, not a float.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}={shorten(value)} has the wrong type: expected a number")
        value = float(value)
        if not math.isfinite(value) and _ITEM_INDEX.sub("", path) not in NON_FINITE_FLOAT_FIELDS:
            raise ValueError(f"{path}={shorten(value)} is invalid: must be a finite number (not inf or nan)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}={shorten(value)} has the wrong type: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}={shorten(value)} has the wrong type: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}={shorten(value)} has the wrong type: expected a string"
                             f"{_quote_hint(path, value, tp)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


def _quote_hint(path: str, value: Any, tp: Any) -> str:
    """How to keep a scalar text where a string is expected and YAML read it as a number, a bool or null."""
    if not (tp is str or str in typing.get_args(tp)) or "[" in path:
        return ""
    if value is None:
        return "; YAML reads an empty value, ~ and null as null: give a string"
    if isinstance(value, bool):
        what, text = "yes/no, on/off and true/false as true or false", "..."
    elif isinstance(value, (int, float)):
        text = shorten(value, limit=40)
        what = f"{text} as a number"
    else:
        return ""
    leaf = path.rsplit(".", 1)[-1]
    return f"; YAML reads {what}: quote it to keep it text, --set '{path}=\"{text}\"' (in a file: {leaf}: \"{text}\")"


NON_FINITE_FLOAT_FIELDS: frozenset[str] = frozenset()
"""Dotted float fields that may be inf or nan (list items without their [i]); every other float field must be
finite. None today: no field gives inf a meaning (use 0 where a field documents 0 as off)."""

_ITEM_INDEX = re.compile(r"\[\d+\]")


MOVED_KEYS = {
    **{f"rollout.{k}": f"rollout.sglang.{k}" for k in (
        "server_urls", "router_url", "num_servers", "request_timeout_s", "server_device", "server_args",
        "max_total_tokens", "max_inflight", "max_server_restarts", "release_memory", "sync_method")},
    "rollout.sync_bucket_mb": "weight_sync.bucket_mb",
    "rollout.sync_verify": "weight_sync.verify",
    "rollout.sync_verify_tol": "weight_sync.verify_tol",
    "rollout.sync_probe_tokens": "weight_sync.probe_tokens",
}
"""Old dotted key -> its new place; a config (YAML or --set) still using an old key fails naming the new one."""


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    moved = [f"{prefix}.{k}" if prefix else k for k in unknown]
    moved = [(old, MOVED_KEYS[old]) for old in moved if old in MOVED_KEYS]
    if moved:
        raise ValueError("; ".join(f"{old} moved: use {new}" for old, new in moved)
                         + " (the config sections were regrouped; see configs/README.md)")
    if unknown:
        where = prefix or "top level"
        listed = ", ".join(shorten(k, limit=60) for k in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ValueError(f"unknown config key(s) {listed}{more} in {where}; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(path, value, hints[key])
    try:
        return cls(**kwargs)
    except ValueError as exc:
        # Schedules validate with a generic prefix; give them their full dotted path.
        msg = str(exc)
        if prefix and msg.startswith("schedule."):
            msg = f"{prefix}.{msg[len('schedule.'):]}"
        raise ValueError(msg) from None


def config_from_dict(data: dict | None) -> RunConfig:
    """Build a RunConfig from a (sparse) nested dict, validating every field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    return _build(RunConfig, _with_hf_model_fields(data))


def _with_hf_model_fields(data: dict) -> dict:
    """With ``model.hf_dir`` set: the architecture fields the (sparse) config leaves out come from the directory's
    config.json, and those it sets must agree with it (ValueError naming each field, both values and the fix).

    A directory that does not exist here is left to the start of the run (the Actor checks the whole
    ModelConfig: config/hf.py ``check_model_matches_hf``), so a config for another machine still loads.
    """
    model = data.get("model")
    hf_dir = model.get("hf_dir") if isinstance(model, dict) else None
    if not hf_dir or not isinstance(hf_dir, str) or not Path(hf_dir).exists():
        return data
    from megatron_entcov.config.hf import hf_mismatches, read_hf_model_fields  # transformers, lazily

    hf_fields = read_hf_model_fields(hf_dir)
    hints = typing.get_type_hints(ModelConfig)
    given = {k: _coerce(f"model.{k}", model[k], hints[k]) for k in hf_fields if k in model}
    problems = hf_mismatches(given, hf_fields, Path(hf_dir) / "config.json")
    if problems:
        raise ValueError("; ".join(problems))
    return {**data, "model": {**{k: v for k, v in hf_fields.items() if k not in model}, **model}}


def config_to_dict(cfg: Any) -> dict:
    """The full nested dict of a config (every field, defaults included)."""
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {shorten(dotted)}: {shorten(k)} is not a section")
        node = child
    node[keys[-1]] = value


MAX_YAML_DEPTH = 50
"""Deepest nesting of a config's YAML (the sections are 3 levels deep); deeper fails in one line instead of a
RecursionError."""
MAX_YAML_NODES = 10_000
"""Most values (scalars and collections) a config's YAML may hold, counted as aliases expand: a "billion laughs"
chain of anchors fails while it is read, in bounded memory, instead of growing into gigabytes downstream."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    """A YAML document the strict loader refuses; the message says why and where, without the file."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key twice in one mapping (YAML would keep the last silently), nesting
    deeper than MAX_YAML_DEPTH, more than MAX_YAML_NODES values as aliases expand, and an alias inside its own
    anchor. Composing sees all four: it tracks the dotted path being composed (for the messages), the depth, and
    each finished node's expanded size and height (an alias adds its anchor's)."""

    def __init__(self, text: str, prefix: str = "") -> None:
        super().__init__(text)
        self._path: list[str] = [prefix] if prefix else []
        self._depth = 0
        self._values = 0
        self._aliases = 0
        self._shape: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded values, expanded height)

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        item = isinstance(index, int) and bool(self._path)
        if isinstance(index, yaml.ScalarNode):
            self._path.append(index.value)
        elif item:
            self._path[-1] += f"[{index}]"
        if self.check_event(yaml.AliasEvent):
            node = self._compose_alias(where)
        else:
            node = self._compose_new(parent, index, where)
        if isinstance(index, yaml.ScalarNode):
            self._path.pop()
        elif item:
            self._path[-1] = self._path[-1][:self._path[-1].rindex("[")]
        return node

    def _compose_alias(self, where: str):
        anchor = self.peek_event().anchor
        node = super().compose_node(None, None)  # the anchored node (an undefined alias fails here)
        if id(node) not in self._shape:
            raise _Refused(f"alias *{_one_line(anchor, 40)} at {where} refers to the collection that contains it; "
                           "write the values out")
        values, height = self._shape[id(node)]
        self._aliases += 1
        self._count(values, self._depth + height, where)
        return node

    def _compose_new(self, parent, index, where: str):
        self._depth += 1
        self._count(0, self._depth, where)
        before = self._values
        node = super().compose_node(parent, index)
        self._depth -= 1
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            self._check_keys(node)
            children = [child for pair in node.value for child in pair]
        height = 1 + max((self._shape[id(c)][1] for c in children), default=0)
        self._shape[id(node)] = (self._values - before + 1, height)
        self._count(1, 0, where)
        return node

    def _count(self, values: int, depth: int, where: str) -> None:
        self._values += values
        if depth > MAX_YAML_DEPTH:
            raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels at {where}; a config needs a few levels")
        if self._values > MAX_YAML_NODES:
            what = "aliases expand to" if self._aliases else "the document holds"
            raise _Refused(f"{what} more than {MAX_YAML_NODES} values (at {where}); a config needs far fewer"
                           + (": write it without chains of anchors" if self._aliases else ""))

    def _check_keys(self, node: yaml.MappingNode) -> None:
        first: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                continue
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first:
                seen = first[(key.tag, key.value)]
                lines = f"twice on line {line}" if seen == line else f"twice, at lines {seen} and {line}"
                raise _Refused(f"key {shorten('.'.join([*self._path, key.value]))} appears {lines}; YAML would "
                               "keep only the last: write it once")
            first[(key.tag, key.value)] = line


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _parse_yaml(text: str, label: str, prefix: str = "") -> Any:
    """One YAML document read by the strict loader; any fault is a one-line ValueError starting with ``label``
    (the file or the --set item). ``prefix``: the dotted key the document is the value of (--set)."""
    loader = _StrictLoader(text, prefix)
    try:
        return loader.get_single_data()
    except _Refused as exc:
        raise ValueError(f"{label}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({exc.context})" if exc.context else ""
        raise ValueError(f"{label} is not valid YAML: {_one_line(f'{where}{exc.problem}{context}')}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{label} is not valid YAML: {_one_line(exc)}") from None
    except ValueError as exc:  # a scalar YAML's constructors cannot convert, e.g. an integer of 5,000 digits
        raise ValueError(f"{label}: YAML cannot convert a value ({_one_line(exc, 100)})") from None
    finally:
        loader.dispose()


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` strings to a nested dict; values are parsed as YAML (1e-6, true, [1, 2])."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {shorten(item)} is invalid: use dotted.key=value, e.g. loss.name=kl_cov")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"--set {shorten(item)} is invalid: the key is empty")
        value = _parse_yaml(raw, f"--set {shorten(item)}", prefix=key) if raw.strip() else None
        _set_dotted(data, key, value)
    return data


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = (), child: Path | None = None) -> dict:
    """A YAML config; a top-level ``base: other.yaml`` (relative to this file) is loaded first and overridden.
    ``child``: the file whose ``base`` this is (named in messages)."""
    label = f"--config {shorten(str(path))}"
    if child is not None:
        label = f"base file {shorten(str(path))} (of {shorten(str(child))})"
    if not path.is_file():
        raise ValueError(f"{label}: no such file")
    if path.resolve() in seen:
        raise ValueError(f"{label}: 'base' files form a cycle")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{label}: cannot read it ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{label}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line} (byte offset "
                         f"{exc.start}); save the file as UTF-8") from None
    data = _parse_yaml(text, label) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{label}: the top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ValueError(f"{label}: base={shorten(base)} must be a file name")
        data = _merge(_read_yaml(path.parent / base, seen + (path.resolve(),), child=path), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML file (sparse overrides of the defaults, optionally on top of a ``base:`` file), apply
    ``--set`` overrides, validate."""
    data: dict = _read_yaml(Path(path)) if path is not None else {}
    apply_overrides(data, overrides or [])
    return config_from_dict(data)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_sha() -> str | None:
    return _git("rev-parse", "HEAD") or None


def source_revision() -> str:
    """The code a run used: '<git sha>', with ' (uncommitted changes)' when tracked files differ from it, or
    'unknown (not a git checkout)' for an installed package (its version is in megatron_entcov.__version__)."""
    sha = _git_sha()
    if sha is None:
        return "unknown (not a git checkout)"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return sha + (" (uncommitted changes)" if dirty else "")


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every field) and the git SHA as YAML; the file loads back to an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# resolved config; git {_git_sha() or 'unknown'}\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
