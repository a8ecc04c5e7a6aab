"""The command line's machinery: flags generated from the settings dataclasses, `--config FILE` for every command,
the options several commands share, and the checks main() makes of what went wrong."""

from __future__ import annotations

import functools
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import torch

from ..config import ConfigError, default_of, field_types, help_of, read_toml
from ..models import SPECS, all_presets
from ..runs.choose import source_checkpoint


def dataclass_options(*classes: type, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                      defaults: dict[str, Any] | None = None):
    """Add a --flag for every field of the given dataclasses (or those named in `only`); unset flags arrive as None.

    `defaults` are what the command uses instead of a field's own default, shown in the help as such. A field
    whose metadata says `required` is a required option (accepts_config lets a --config file give it).
    """

    def decorate(fn):
        for cls in reversed(classes):
            types = field_types(cls)
            for f in reversed(fields(cls)):
                if f.name in exclude or (only is not None and f.name not in only):
                    continue
                flag = "--" + f.name.replace("_", "-")
                default = (defaults or {}).get(f.name, default_of(f))
                help_text = help_of(f) + (f"  [default: {default}]" if default not in (None, "", []) else "")
                metavar = f.metadata.get("metavar")
                if types[f.name] is bool:
                    option = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
                elif typing.get_origin(types[f.name]) is list:  # repeatable; unset arrives as None
                    option = click.option(flag, f.name, multiple=True, help=help_text, metavar=metavar,
                                          type=click.Choice(f.metadata["choices"]) if "choices" in f.metadata else str,
                                          callback=lambda ctx, param, value: list(value) or None)
                elif "choices" in f.metadata:
                    option = click.option(flag, f.name, type=click.Choice(f.metadata["choices"]), default=None,
                                          help=help_text, required=f.metadata.get("required", False))
                else:
                    option = click.option(flag, f.name, type=types[f.name], default=None, help=help_text,
                                          metavar=metavar, required=f.metadata.get("required", False))
                fn = option(fn)
        return fn

    return decorate


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The flags the user actually passed."""
    return {k: v for k, v in values.items() if v is not None}


arch_option = click.option(
    "--arch", type=click.Choice(sorted(SPECS)), default=None,
    help="Model family: gpt2 (GPT-2: learned positions, LayerNorm, GELU) or llama (Llama/Qwen3/minimind: RMSNorm, "
         "rotary positions, grouped-query attention, SwiGLU).  [default: the preset's, else gpt2]")


preset_option = click.option(
    "--preset", type=click.Choice(all_presets()), default=None,
    help="Model shape to start from (it sets --arch); shape flags override single values.  "
         "[default: mini (gpt2), llama-mini (llama)]")


checkpoint_option = click.option(
    "--checkpoint", "which", metavar="best|latest|STEP", default=None,
    help="Which checkpoint a run directory SOURCE means: best (the lowest val loss, RUN_DIR/best.json), latest "
         "(the newest) or a step number.  [default: best, or the newest for a run without best.json]")


def pick(source: str, which: str | None) -> str:
    """SOURCE with a run directory turned into its chosen checkpoint; one line on stderr says which and why."""
    say = lambda message: click.echo(f"gptforge: {message}", err=True)  # noqa: E731
    return source_checkpoint(source, which, note=say, warn=lambda message: say(f"warning: {message}"))


config_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False),
    help="TOML file with settings (same names as the flags, with _ or -); flags given here win.",
)


def accepts_config(cmd: click.Command) -> click.Command:
    """Give a command `--config FILE`: a TOML file of flat keys named like its options (with _ or -), read before
    the command runs, each value converted and checked as the option's own (choices, numbers); options given on the
    command line win. prepare's --config already names a Hugging Face dataset's configuration: there a value that
    is a .toml file is the settings file."""
    options = {max(p.opts, key=len).lstrip("-").replace("-", "_"): p  # keyed as the flag is spelled (--to: to)
               for p in cmd.params if isinstance(p, click.Option) and p.name != "help"}
    required = [p for p in options.values() if p.required]
    for p in required:  # the file may give them: checked after it is read
        p.required = False
    shared = "config" in options
    if not shared:
        cmd.params.append(click.Option(["--config", "config_file"], type=click.Path(dir_okay=False), default=None,
                                       help="TOML file with settings (the options' names, with _ or -); options "
                                            "given on the command line win."))
    callback = cmd.callback

    @functools.wraps(callback)
    def run(**kwargs):
        path = kwargs.pop("config_file", None)
        if shared and str(kwargs.get("config") or "").endswith(".toml") and Path(kwargs["config"]).is_file():
            path, kwargs["config"] = kwargs["config"], None
        if path:
            for key, value in _settings_file(path, options).items():
                if kwargs.get(options[key].name) in (None, ()):
                    kwargs[options[key].name] = value
        for p in required:
            if kwargs.get(p.name) is None:
                raise click.MissingParameter(ctx=click.get_current_context(), param=p)
        return callback(**kwargs)

    cmd.callback = run
    return cmd


def _settings_file(path: str, options: dict[str, click.Option]) -> dict[str, Any]:
    """The values of a command's --config file, keyed and converted as its options (one line for a bad one)."""
    raw = read_toml(path, {}, {name: object for name in options if name != "config"})
    ctx = click.get_current_context()
    out = {}
    for name, value in raw.items():
        try:
            out[name] = options[name].process_value(ctx, value)
        except click.BadParameter as e:
            raise ConfigError(f"{path}: {name} = {value!r}: {e.format_message()}") from None
    return out


def without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "not enough memory", "Cannot allocate memory")


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def out_of_memory(e: BaseException) -> bool:
    """Whether an error is an allocation that failed (CPU or CUDA)."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or any(m in str(e) for m in OUT_OF_MEMORY)
