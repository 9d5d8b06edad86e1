"""Command-line options from the typed config, with jsonargparse: every `JobConfig` field is a `--section.field`
option whose `--help` line is the field's doc, type and default, and YAML files are read with the same types.

Precedence, whatever the order on the command line: dataclass defaults < `--recipe NAME` < `--config FILE` (each,
in order) < `--section.field VALUE` flags. Values are YAML (`--optim.betas [0.9, 0.99]`, `--train.max_steps null`,
`--data.sources '[{path: a.jsonl, weight: 2}]'`). A bad value ends in one `ConfigError` line naming the option (or
the file and key) and what it takes; the rules of each field live with the field in `gist_scale.config`.

Commands share the sections by building on `job_parser` and adding their own options to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings

from gist_scale.config import SECTIONS, ConfigError, JobConfig, SourceConfig, unknown_name
from gist_scale.places import text_file_problem
from gist_scale.recipes import recipe_path

# The field docs are attribute docstrings ("""...""" under each field), as torchtitan and tyro read them.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

__all__ = ["job_parser", "load_config", "parse_job"]


def job_parser(prog: str = "gist-scale train", description: str | None = None, positional: str = "") -> ArgumentParser:
    """A parser of every config field plus `--recipe` and `--config`; a command adds its own options (and the
    `positional` arguments its usage line names) to it."""
    usage = f"{prog} [--recipe NAME] [--config FILE] [--SECTION.FIELD VALUE ...] [OPTIONS] {positional}".rstrip()
    parser = ArgumentParser(prog=prog, description=description, usage=usage, exit_on_error=False)
    parser.add_argument("--recipe", metavar="NAME",
                        help="a shipped recipe (`gist-scale recipes` lists them), applied before --config")
    parser.add_argument("--config", metavar="FILE", action="append",
                        help="YAML file with sections model:, data:, ... (repeatable, later files win); flags "
                             "override it. `RUN/config.yaml` of an earlier run reproduces that run")
    parser.add_class_arguments(JobConfig, fail_untyped=True, sub_configs=False)
    return parser


def parse_job(parser: ArgumentParser, argv: Sequence[str] | None) -> tuple[JobConfig, Namespace]:
    """The `JobConfig` and the command's own options, from defaults, recipe, config files and flags, in that order.

    Raises `ConfigError` with one line for any bad option, file or value.
    """
    files, rest = _files(argv)
    names = {f.name for f in dataclasses.fields(JobConfig)}
    namespace = parser.get_defaults()
    for path in files:
        content = _read_yaml(path) or {}
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, ...)")
        if unknown := [key for key in content if key not in names]:
            raise unknown_name(f"section in {path}:", unknown[0], sorted(names))
        # A file holds config sections; a command's required arguments (`OUT_DIR`) come with the flags, checked there.
        namespace = _parsed(lambda: parser.parse_object(content, namespace=namespace, defaults=False,
                                                        _skip_required=True), f"{path}: ")
    namespace = _parsed(lambda: parser.parse_args(rest, namespace=namespace), "--")
    instantiated = _parsed(lambda: parser.instantiate(namespace), "--")
    return JobConfig(**{name: instantiated[name] for name in names}), instantiated


def load_config(argv: Sequence[str] | None = None,
                config_file: str | Path | Sequence[str | Path] | None = None) -> JobConfig:
    """The `JobConfig` from flags (`["--optim.lr", "1e-5"]`) over YAML files (a recipe's, then a user's)."""
    files = [] if config_file is None else [config_file] if isinstance(config_file, (str, Path)) else config_file
    argv = [arg for path in files for arg in ("--config", str(path))] + list(argv or [])
    return parse_job(_shared_parser(), argv)[0]


# Building a parser reads every field's doc (a few tenths of a second); in-process callers load configs often.
_shared_parser = functools.cache(job_parser)


def _files(argv: Sequence[str] | None) -> tuple[list[Path], list[str]]:
    """`--recipe` and `--config` taken out of `argv` (they apply before every flag), and the rest; a bare `--debug`
    means `--debug true`."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--recipe")
    pre.add_argument("--config", action="append", default=[])
    pre.add_argument("--debug", nargs="?", const="true")
    known, rest = pre.parse_known_args(_joined_negative_numbers(argv or []))
    files = ([recipe_path(known.recipe)] if known.recipe else []) + [Path(file) for file in known.config]
    return files, rest + (["--debug", known.debug] if known.debug is not None else [])


_NEGATIVE_NUMBER = re.compile(r"-(\.?\d|inf|nan)", re.IGNORECASE)
"""The start of a negative number (`-1e-5`, `-.5`, `-inf`): a value, since no option name starts that way."""


def _joined_negative_numbers(argv: Sequence[str]) -> list[str]:
    """`--optim.lr -1e-5` as `--optim.lr=-1e-5`: argparse takes a value that starts with `-` for an option (it
    knows only plain negative numbers like -1), and the field's own check should say what is wrong with it."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and _NEGATIVE_NUMBER.match(arg):
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def _parsed(step: Callable[[], Any], where: str) -> Any:
    """Run one parsing step; jsonargparse's multi-line errors become one `ConfigError` line."""
    try:
        return step()
    except argparse.ArgumentError as error:
        raise ConfigError(_one_line(str(error), where)) from None
    except ValueError as error:  # a field's own check, raised while a nested entry (a data source) is built
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{where.removeprefix('--')}{error}") from None


_KEY = re.compile(r'Parser key "([^"]+)":')
_EXPECTED = re.compile(r"Expected an? (.+?)\. Got value: (.*)")
_UNION = re.compile(r"Union subtypes\s*Subtypes: \[(.*)\]\s*\n(?:.|\n)*Given value: (.*)")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_UNKNOWN_KEY = re.compile(r"Group '([^']+)' does not accept (?:option|nested key) '([^']+)'")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)")
_TOP_LEVEL_COMMA = re.compile(r",\s*(?![^\[]*\])")
"""A comma that no `]` closes: the one of `typing.Literal['a', 'b'], tuple[int, ...], <class 'NoneType'>` that
separates the subtypes of a union (none of the config's types nests brackets)."""


def _one_line(message: str, where: str) -> str:
    """One line from jsonargparse's multi-line error: `--train.batch_size='abc': expected int`, or an unknown option
    with the closest known name. `where` is `--` for flags and `FILE: ` for a YAML file."""
    if keys := _KEY.findall(message):
        # A config field as typed (`train.batch_size`); a command's own option is spelt with hyphens (`num-negatives`).
        key = keys[0] if "." in keys[0] else keys[0].replace("_", "-")
        shown = f"{key} entry's {keys[-1]}" if len(keys) > 1 else key  # the last: a field inside a data source
        if unknown := _NOT_ACCEPTED.search(message):  # a key inside a data source, the one list of mappings
            fields = [f.name for f in dataclasses.fields(SourceConfig)]
            return str(unknown_name(f"key in an entry of {where.removesuffix(': ') + ' ' if where != '--' else '--'}"
                                f"{key}:", unknown.group(1), fields))
        if union := _UNION.search(message):
            names = [_type_name(name) for name in _TOP_LEVEL_COMMA.split(union.group(1))]
            return f"{where}{shown}={union.group(2).strip()!r}: expected {' or '.join(names)}"
        if expected := _EXPECTED.search(message):
            value, kind = expected.group(2).strip(), _type_name(expected.group(1))
            hint = (" (YAML reads no/yes/on/off as booleans: quote the name)"
                    if kind.startswith("one of") and value in ("True", "False") else "")
            return f"{where}{shown}={value!r}: expected {kind}{hint}"
    if match := _UNKNOWN_KEY.search(message):
        section, key = match.groups()
        return str(unknown_name(f"key in {where.removesuffix(': ')} section {section!r}:" if where != "--"
                            else f"option --{section}.", key, _fields_of(section)))
    if match := _UNRECOGNIZED.search(message):
        return str(unknown_name("option", match.group(1), [f"--{name}" for name in _option_names()]))
    return where.removeprefix("--") + " ".join(line.strip() for line in message.splitlines() if line.strip())


def _type_name(expected: str) -> str:
    """`<class 'int'>` -> `int`; `typing.Literal['no', 'bf16']` -> `one of no, bf16`; a tuple -> a YAML list."""
    if literal := re.fullmatch(r"typing\.Literal\[(.*)\]", expected):
        return "one of " + literal.group(1).replace("'", "")
    if sized := re.fullmatch(r"tuple with (\d+) elements", expected):
        return f"a list of {sized.group(1)} values, e.g. [0.9, 0.999]"
    name = re.sub(r"<class '([^']+)'>", r"\1", expected)
    if re.match(r"(tuple|list)\b", name):
        return "a YAML list, e.g. [a, b]"
    return {"NoneType": "null"}.get(name, name)


def _fields_of(section: str) -> list[str]:
    cls = SECTIONS.get(section)
    return [f.name for f in dataclasses.fields(cls)] if cls else []


def _option_names() -> list[str]:
    tops = [f.name for f in dataclasses.fields(JobConfig) if f.name not in SECTIONS]
    return tops + [f"{section}.{name}" for section in SECTIONS for name in _fields_of(section)] + ["config", "recipe"]


def _read_yaml(path: Path) -> Any:
    """A YAML file's content; a missing file, a non-UTF-8 byte or a syntax error is named with its line and column."""
    if path.is_dir():
        raise ConfigError(f"--config {path}: is a directory; give the YAML file (e.g. RUN/config.yaml)")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        return yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {text_file_problem(path)}; save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{position}: YAML syntax error: {_yaml_problem(error)}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's problem, with the construct it was inside and where that started (an unclosed `[` ...)."""
    context, mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and mark is not None:
        context = f"{context} (line {mark.line + 1}, column {mark.column + 1})"
    return ": ".join(filter(None, (context, getattr(error, "problem", None)))) or str(error)
