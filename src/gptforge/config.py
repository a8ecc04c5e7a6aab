"""Settings from dataclasses, presets, TOML files and command-line flags, in that order of precedence.

Each component owns a small dataclass (GPTConfig in models/gpt2.py, DataConfig in data.py, TrainConfig in
training/config.py, SampleConfig and GenerateConfig in generate.py, EvalConfig in evaluate.py, ServeConfig in serve.py,
BenchConfig in bench.py, PrepareConfig in prepare.py). Every field carries its help text in
``metadata["help"]``; the CLI's flags are generated from the fields (``emb_dim`` -> ``--emb-dim``),
and a ``--config`` TOML file uses the same names, flat or in tables named after the section::

    preset = "mini"
    [train]
    lr = 3e-4
    max_steps = 2000
"""

from __future__ import annotations

import difflib
import math
import sys
import types
import typing
from dataclasses import MISSING, Field, asdict, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import ConfigError

SEED_MAX = 2**32 - 1  # numpy's seed range; the data order seeds torch with seed * 1_000_003 + epoch (< 2**64)


def flag(name: str) -> str:
    """The command-line flag of a field: emb_dim -> --emb-dim (a --config file takes either spelling)."""
    return "--" + name.replace("_", "-")


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                above: bool = False, below: bool = False, says: str | None = None) -> None:
    """Refuse a number outside [low, high] with a ConfigError naming its flag; None passes (unset).

    `above` makes the low end open (value > low), `below` the high end (value < high). Floats must
    be finite. `says` words the range in the message instead ("a positive integer"). ConfigError is a
    ValueError, so the dataclass checks raise what a library user expects.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{flag(name)} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{flag(name)} must be a finite number, got {value}")
    ok = low is None or (value > low if above else value >= low)
    ok = ok and (high is None or (value < high if below else value <= high))
    if ok:
        return
    if says is not None:
        want = says
    elif high is None:
        want = f"above {low}" if above else f"at least {low}"
    elif low is None:
        want = f"below {high}" if below else f"at most {high}"
    else:
        want = f"in {'(' if above else '['}{low}, {high}{')' if below else ']'}"
    raise ConfigError(f"{flag(name)} must be {want}, got {value}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Refuse a value that is not one of `choices` with a ConfigError naming its flag."""
    if value not in choices:
        raise ConfigError(f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}")


def help_of(f: Field) -> str:
    return f.metadata.get("help", "")


def field_types(cls: type) -> dict[str, Any]:
    """Each field's type with Optional unwrapped: {'stride': int, 'lr': float, ...}."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        t = hints[f.name]
        if typing.get_origin(t) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(t) if a is not type(None)]
            t = args[0] if len(args) == 1 else t
        out[f.name] = t
    return out


def default_of(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def check_value(where: str, name: str, value: Any, typ: Any) -> Any:
    """Check a value read from a file against a field's type; ints are accepted for floats."""
    if value is None:
        return None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(typ, True)
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[typ]
        raise ConfigError(f"{where}: {name} must be {expected}, got {value!r}")
    return float(value) if typ is float else value


def read_toml(path: str | Path, sections: dict[str, type], top_level: dict[str, Any]) -> dict[str, Any]:
    """Read a TOML config into a flat {field name: value} dict, checking every key and type.

    `sections` maps table names to dataclasses; `top_level` maps other allowed keys to types.
    Keys may be written with dashes or underscores.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML (not UTF-8 text at byte {e.start})") from None
    return check_toml(raw, path, sections, top_level)


def check_toml(raw: dict[str, Any], path: str | Path, sections: dict[str, type],
               top_level: dict[str, Any]) -> dict[str, Any]:
    """read_toml's checks of keys and types on an already parsed TOML dict (`path` names it in errors)."""
    types_by_key = dict(top_level)
    for cls in sections.values():
        types_by_key.update(field_types(cls))
    known = sorted(types_by_key)

    def take(key: str, value: Any, table: str | None) -> None:
        name = key.replace("-", "_")
        allowed = field_types(sections[table]) if table else types_by_key
        if name not in allowed:
            where = f"[{table}]" if table else "the top level"
            home = [t for t, cls in sections.items() if t and name in field_types(cls)]
            if home:  # a real key in another table: say which
                raise ConfigError(f"{path}: {key!r} belongs in [{home[0]}], not in {where}; move it there")
            hint = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(
                f"{path}: unknown key {key!r} in {where}"
                + (f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(known)}")
            )
        out[name] = check_value(str(path), name, value, allowed[name])

    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            if key not in sections:
                raise ConfigError(f"{path}: unknown table [{key}]; known tables: {', '.join(sections)}")
            for k, v in value.items():
                take(k, v, key)
        else:
            take(key, value, None)
    return out


def build(cls: type, *layers: dict[str, Any]):
    """An instance of cls from its defaults, overridden by each layer in turn (later layers win)."""
    names = {f.name for f in fields(cls)}
    values = {f.name: default_of(f) for f in fields(cls)}
    for layer in layers:
        values.update({k: v for k, v in layer.items() if k in names})
    try:
        return cls(**values)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def to_toml_dict(**sections: Any) -> dict[str, Any]:
    """Dataclasses and plain values -> a TOML-ready dict (None values left out: TOML has no null)."""
    out: dict[str, Any] = {}
    for name, value in sections.items():
        if hasattr(value, "__dataclass_fields__"):
            out[name] = {k: v for k, v in asdict(value).items() if v is not None}
        elif value is not None:
            out[name] = value
    # TOML wants plain keys before tables
    return dict(sorted(out.items(), key=lambda kv: isinstance(kv[1], dict)))


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its help text (what the CLI shows for the flag) and its checks, declared once:
    `choices` (a tuple of allowed values), or a range `low`/`high` with `above`/`below` for open ends and
    `says` to word it (see check_range). `check_fields` applies them; the CLI makes `choices` the flag's choices."""
    return field(default=default, metadata={"help": help, **extra})


RANGE_KEYS = ("low", "high", "above", "below", "says")


def check_fields(obj: Any) -> None:
    """Check every field of a settings dataclass against the choices or range its metadata declares (None, an
    unset value, passes); a dataclass's __post_init__ calls this, then makes the checks that join fields."""
    for f in fields(obj):
        check_field(f, getattr(obj, f.name))


def check_field(f: Field, value: Any) -> None:
    """One field's declared choices and range (check_fields, or a value checked before its dataclass is built)."""
    if value is None:
        return
    if "choices" in f.metadata:
        for one in (value if isinstance(value, list) else [value]):
            check_choice(f.name, one, tuple(f.metadata["choices"]))
    if any(k in f.metadata for k in RANGE_KEYS):
        check_range(f.name, value, **{k: f.metadata[k] for k in RANGE_KEYS if k in f.metadata})

