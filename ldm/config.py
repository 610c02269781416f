"""Typed configuration: dataclass defaults < YAML file or preset < command-line overrides, one clear error.

Every component declares its settings as a dataclass beside its code (``ScheduleConfig`` in schedule.py,
``SamplerConfig`` in samplers/config.py, ...). This module only merges and checks them:

    cfg = load_config(RunConfig, "sd15", ["sampler.steps=30", "diffusion.schedule.zero_terminal_snr=true"])

- ``OmegaConf.structured`` gives the type checks; ``OmegaConf.to_object`` builds the dataclass, so each
  ``__post_init__`` validator runs.
- A field declared with ``choice(default, *allowed)`` keeps its allowed values in the field metadata; they are
  checked here (with the full dotted key) and by ``check_choices`` for direct construction.
- Every failure is one ``ConfigError`` (a ValueError) naming the dotted key, the expected type or the allowed
  values, and where the value came from (file or override). OmegaConf's own messages never reach the user raw.

Design note: this module imports no section config, because those modules import ``choice`` from here; the
top-level schemas that compose sections (``RunConfig``) live in ldm/run_config.py.
"""
import dataclasses
import difflib
import os
import re
import tempfile
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "ConfigError", "check_choices", "choice", "config_from_yaml_text", "format_config", "list_presets",
    "load_config", "parse_overrides", "preset_path", "save_config", "to_yaml",
]

CHOICES = "choices"  # dataclass field metadata key holding the allowed values
PRESET_PACKAGE = "configs"


class ConfigError(ValueError):
    """A configuration problem; ``key`` is the full dotted key (or None), ``source`` the file / override."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.key = key
        self.source = source


# --------------------------------------------------------------------------------------------- choices


def choice(default: Any, *allowed: Any) -> Any:
    """A dataclass field whose value must be one of ``allowed``: ``sigma_spacing: str = choice("discrete", ...)``."""
    if not allowed:
        raise TypeError("choice() needs at least one allowed value")
    if default not in allowed:
        raise TypeError(f"choice(): default {default!r} is not among the allowed values {allowed}")
    return field(default=default, metadata={CHOICES: tuple(allowed)})


def choices_of(f: dataclasses.Field) -> tuple | None:
    return f.metadata.get(CHOICES)


def _choice_error(key: str, value: Any, allowed: tuple, expected: str | None = None, origin: str = "") -> ConfigError:
    exp = f"expected {expected}, " if expected else ""
    return ConfigError(
        f"{key}: {value!r} is not an allowed value; {exp}one of: {', '.join(map(str, allowed))}{_where(origin)}",
        key=key, source=origin or None,
    )


def check_choices(obj: Any, section: str = "") -> None:
    """Validate the ``choice`` fields of a dataclass instance (call from ``__post_init__``); not recursive."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        allowed = choices_of(f)
        if allowed is not None and getattr(obj, f.name) not in allowed:
            raise _choice_error(_join(section, f.name), getattr(obj, f.name), allowed, _type_name(hints[f.name]))


# ------------------------------------------------------------------------------------- schema helpers


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _where(origin: str) -> str:
    return f" ({origin})" if origin else ""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _type_name(tp: Any) -> str:
    tp, optional = _unwrap_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        name = f"a mapping (section {tp.__name__})"
    elif origin in (list, tuple, Sequence) and args:
        name = f"list of {_type_name(args[0])}"
    elif origin is dict and len(args) == 2:
        name = f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    elif tp is Any:
        name = "any value"
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name} or null" if optional else name


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _section_type(tp: Any) -> type | None:
    tp, _ = _unwrap_optional(tp)
    return tp if dataclasses.is_dataclass(tp) and isinstance(tp, type) else None


def _split_key(key: str) -> list[str]:
    """'a.b[0].c' -> ['a', 'b', 'c'] (list indices are dropped: the schema check stops at lists)."""
    return [re.sub(r"\[.*?\]", "", p) for p in key.split(".")]


def _lookup(cls: type, key: str) -> tuple[dataclasses.Field, Any] | None:
    """The field and type hint for a dotted key, or None where the key leaves the dataclass schema."""
    found = None
    for part in _split_key(key):
        if cls is None:
            return found if part.isdigit() else None
        fields = _fields(cls)
        if part not in fields:
            return None
        found = fields[part]
        cls = _section_type(found[1])
    return found


def _check_tree(cls: type, tree: Any, prefix: str, origin: str) -> None:
    """Unknown keys and non-mapping sections in incoming data (a plain dict), before OmegaConf sees it."""
    if not isinstance(tree, dict):
        valid = ", ".join(_fields(cls))
        raise ConfigError(
            f"{prefix or '<root>'}: expected a mapping (section {cls.__name__} with keys: {valid}), "
            f"got {tree!r}{_where(origin)}", key=prefix or None, source=origin or None,
        )
    fields = _fields(cls)
    for k, v in tree.items():
        key = _join(prefix, k)
        if k not in fields:
            near = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            where = f"section {prefix!r} ({cls.__name__})" if prefix else cls.__name__
            raise ConfigError(
                f"{key}: unknown key {k!r} in {where}{_where(origin)}.{hint} Valid keys: {', '.join(fields)}",
                key=key, source=origin or None,
            )
        sub = _section_type(fields[k][1])
        if sub is not None and not (v is None and _unwrap_optional(fields[k][1])[1]):
            _check_tree(sub, v, key, origin)


def _expected(cls: type, key: str) -> str:
    found = _lookup(cls, key)
    if found is None:
        return "a value of the declared type"
    f, tp = found
    allowed = choices_of(f)
    if typing.get_origin(_unwrap_optional(tp)[0]) in (list, tuple, Sequence) and re.search(r"\[\d+\]$", key):
        tp = typing.get_args(_unwrap_optional(tp)[0])[0]  # an element of a list field
        allowed = None
    name = _type_name(tp)
    return f"{name}, one of: {', '.join(map(str, allowed))}" if allowed else name


_ABSENT = object()


def _select(data: Any, key: str) -> Any:
    """The incoming value at ``key`` (to quote it in a message), or _ABSENT."""
    if not isinstance(data, dict):
        return _ABSENT
    try:
        return OmegaConf.select(OmegaConf.create(data), key, default=_ABSENT)
    except Exception:  # noqa: BLE001 - only used to quote the offending value in a message
        return _ABSENT


def _translate(e: OmegaConfBaseException, cls: type, data: Any, origin: str, key: str | None = None) -> ConfigError:
    """One readable ConfigError from an OmegaConf exception (type mismatch, unknown key, missing value ...)."""
    key = getattr(e, "full_key", None) or key or ""
    got = _select(data, key)
    first_line = (getattr(e, "msg", None) or str(e)).splitlines()[0]
    if e.__class__.__name__ == "MissingMandatoryValue":
        msg = f"{key}: missing value; expected {_expected(cls, key)}"
    elif isinstance(e, KeyError) or e.__class__.__name__ in ("ConfigKeyError", "ConfigAttributeError"):
        msg = f"{key}: unknown key ({first_line})"
    elif got is not _ABSENT or isinstance(e, ValueError):
        shown = first_line if got is _ABSENT else "null" if got is None else f"{got!r} ({type(got).__name__})"
        msg = f"{key}: expected {_expected(cls, key)}, got {shown}"
    else:
        msg = f"{key}: {first_line}"
    return ConfigError(msg + _where(origin), key=key or None, source=origin or None)


# ------------------------------------------------------------------------------------------ overrides


_KEY = re.compile(r"^[A-Za-z_][\w-]*(\[\d+\])*(\.[A-Za-z_][\w-]*(\[\d+\])*)*$")


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``["sampler.steps=30", "unet.channel_mult=[1,2,4]"]`` -> ``[("sampler.steps", 30), ...]``.

    Values are parsed as YAML, exactly as OmegaConf's dotlist does (``true`` -> True, ``null`` -> None, lists).
    """
    if isinstance(items, (str, bytes)):
        raise ConfigError(f"overrides must be a list of KEY=VALUE strings, got the single string {items!r}")
    out = []
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(
                f"malformed override {item!r}: expected KEY=VALUE, e.g. sampler.steps=30", source=f"override {item!r}"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not _KEY.match(key):
            raise ConfigError(
                f"malformed override {item!r}: {key!r} is not a dotted key like sampler.steps",
                source=f"override {item!r}",
            )
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]  # OmegaConf's YAML parsing
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ConfigError(
                f"{key}: cannot parse the value {raw!r} of override {item!r}: {str(e).splitlines()[0]}",
                key=key, source=f"override {item!r}",
            ) from None
        out.append((key, value))
    return out


def _nest(key: str, value: Any) -> dict:
    """'a.b.c', v -> {'a': {'b': {'c': v}}}; a key with a list index is cut before the index."""
    parts = key.split(".")
    cut = next((i for i, p in enumerate(parts) if "[" in p), None)
    if cut is not None:
        parts, value = parts[: cut + 1], {}
        parts[-1] = parts[-1].split("[")[0]
    for p in reversed(parts):
        value = {p: value}
    return value


# ----------------------------------------------------------------------------------------- loading


def list_presets() -> list[str]:
    """Names of the YAML presets shipped in the ``configs`` package."""
    root = resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    res = resources.files(PRESET_PACKAGE) / f"{name}.yaml"
    if not res.is_file():
        names = list_presets()
        near = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown preset {name!r}.{hint} Available presets: {', '.join(names)}", source=name)
    return Path(str(res))


def _read_source(source: Any) -> tuple[Any, str]:
    """(plain data or None, origin text) for None / dict / YAML path / preset name."""
    if source is None:
        return None, ""
    if isinstance(source, (dict, DictConfig)):
        data = OmegaConf.to_container(source) if isinstance(source, DictConfig) else source
        return data, "from the given mapping"
    looks_like_path = isinstance(source, str) and (source.endswith((".yaml", ".yml")) or os.sep in source)
    if isinstance(source, str) and not (looks_like_path or os.path.exists(source)):
        path = preset_path(source)
        origin = f"in preset {source!r} ({path})"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        origin = f"in {path}"
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}", source=str(path))
    else:
        kind = type(source).__name__
        raise TypeError(f"config source must be None, a dict, a YAML path or a preset name, got {kind}")
    return _parse_yaml(path.read_text(encoding="utf-8"), origin), origin


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        data = OmegaConf.to_container(OmegaConf.create(text)) if text.strip() else {}
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"invalid YAML{_where(origin)}: {e}", source=origin) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top of the YAML{_where(origin)}, got {data!r}", source=origin)
    return data or {}


def _leaf_keys(data: Any, prefix: str = "") -> list[str]:
    if isinstance(data, dict) and data:
        return [k for key, v in data.items() for k in _leaf_keys(v, _join(prefix, key))]
    return [prefix]


def _origin_of(origins: dict[str, str], key: str) -> str:
    """Where the value at ``key`` (or, for a section, any value under it) came from; last writer first."""
    hits = [o for k, o in origins.items() if k == key or k.startswith(key + ".") or key.startswith(k + ".") or not key]
    return "; ".join(dict.fromkeys(reversed(hits)))


# YAML 1.1 reads an unquoted no / off / yes / on as a boolean, which a str field then holds as "False" / "True"
BOOL_WORDS = {"False": ("no", "off", "false"), "True": ("yes", "on", "true")}


def _validate_choices(cls: type, cfg: DictConfig, prefix: str, origins: dict[str, str]) -> None:
    for name, (f, tp) in _fields(cls).items():
        key = _join(prefix, name)
        allowed = choices_of(f)
        if allowed is not None and cfg[name] not in allowed and isinstance(cfg[name], str):
            word = next((w for w in BOOL_WORDS.get(cfg[name], ()) if w in allowed), None)
            if word is not None:  # mixed_precision=no meant the choice "no", not a boolean
                cfg[name] = word
        if allowed is not None and cfg[name] not in allowed:
            raise _choice_error(key, cfg[name], allowed, _type_name(tp), _origin_of(origins, key))
        sub = _section_type(tp)
        if sub is not None and cfg[name] is not None:
            _validate_choices(sub, cfg[name], key, origins)


def _sections(cfg: DictConfig, prefix: str = "") -> list[tuple[str, DictConfig]]:
    """Nested structured sections, children before parents (the order dataclasses are built in)."""
    out = []
    for k in cfg.keys():
        node = cfg[k]
        if isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node)):
            out += _sections(node, _join(prefix, k))
    return out + [(prefix, cfg)]


def _rekey(message: str, section: str) -> tuple[str, str]:
    """Name the full key in a __post_init__ message.

    'schedule.x must ...' raised at section 'diffusion.schedule' -> 'diffusion.schedule.x must ...';
    a message without such a prefix becomes 'section: message'.
    """
    m = re.match(r"^([A-Za-z_][\w.]*)", message)
    if section and m:
        head, last = m.group(1), section.rsplit(".", 1)[-1]
        if head == last or head.startswith(last + "."):
            full = section + head[len(last):]
            return full + message[len(head):], full
    if not section:
        return message, (m.group(1) if m and "." in m.group(1) else "")
    return f"{section}: {message}", section


def _build(cls: type, cfg: DictConfig, origins: dict[str, str]) -> Any:
    """OmegaConf.to_object, with __post_init__ errors re-raised naming the section where they occurred."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _translate(e, cls, None, _origin_of(origins, getattr(e, "full_key", "") or "")) from None
    except ValueError as e:
        for section, node in _sections(cfg):  # find the innermost section whose constructor fails
            try:
                OmegaConf.to_object(node)
            except ValueError as inner:
                message, key = _rekey(str(inner), section)
                origin = _origin_of(origins, key or section)
                raise ConfigError(message + _where(origin), key=key or None, source=origin or None) from None
        raise ConfigError(str(e)) from None


def load_config(cls: type, source: Any = None, overrides: Iterable[str] = ()) -> Any:
    """An instance of dataclass ``cls`` from its defaults < ``source`` < ``overrides``.

    ``source``: None (defaults), a dict, a YAML path, a preset name (``configs/NAME.yaml``), or an instance of
    ``cls`` to start from. ``overrides``: ``KEY=VALUE`` strings. Raises ConfigError on any problem.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    parsed = parse_overrides(overrides)
    if isinstance(source, cls):
        cfg, data, origin = OmegaConf.structured(source), None, ""
    else:
        cfg = OmegaConf.structured(cls)
        data, origin = _read_source(source)
    origins: dict[str, str] = {}
    if data:
        _check_tree(cls, data, "", origin)
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as e:
            raise _translate(e, cls, data, origin) from None
        origins.update((k, origin) for k in _leaf_keys(data))
    for (key, value), item in zip(parsed, overrides):
        where = f"from override {item!r}"
        _check_tree(cls, _nest(key, value), "", where)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise _translate(e, cls, _nest(key, value) if "[" not in key else None, where, key) from None
        origins.pop(key, None)
        origins.update((k, where) for k in _leaf_keys(value, key))
    _validate_choices(cls, cfg, "", origins)
    return _build(cls, cfg, origins)


def config_from_yaml_text(cls: type, text: str, overrides: Iterable[str] = ()) -> Any:
    """Like load_config, from YAML text (e.g. a config stored next to checkpoint weights)."""
    return load_config(cls, _parse_yaml(text, "in the given YAML text"), overrides)


# ----------------------------------------------------------------------------------------- writing


def to_yaml(obj: Any) -> str:
    """The complete config as YAML; ``load_config(type(obj), <that YAML>) == obj``."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj), sort_keys=False)


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write ``to_yaml(obj)`` atomically: a temporary file in the same folder, then ``os.replace``."""
    path = Path(path)
    text = to_yaml(obj)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def format_config(obj: Any) -> str:
    """One ``dotted.key = value`` line per setting, aligned, for logs and ``--print-config``."""
    flat: list[tuple[str, Any]] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, _join(prefix, k))
        else:
            flat.append((prefix, node))

    walk(OmegaConf.to_container(OmegaConf.structured(obj)), "")
    width = max((len(k) for k, _ in flat), default=0)
    header = f"# {type(obj).__name__}"
    return "\n".join([header] + [f"{k:<{width}} = {_show(v)}" for k, v in flat])


def _show(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else str(v)
