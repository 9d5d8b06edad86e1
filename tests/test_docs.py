"""The examples in README.md and docs/*.md cannot rot: every command and config they show is checked against the real
command-line parsers and config loader, without running any training.

- Fenced ```bash / ```sh / ```console blocks are split into simple commands (line continuations joined, comments and
  `$ ` prompts dropped, `&&`, `;`, `|` and redirections handled). `gist-scale ...`, `python -m gist_scale ...`,
  `accelerate launch ... -m gist_scale ...`, `torchrun ... -m gist_scale ...` and the launch scripts' trainer flags
  are checked: the subcommand must be one of `gist_scale.cli.COMMANDS`, its own options must parse with the
  module's `build_parser()`, and `--section.key VALUE` options (train, mine, cache-guide) must name fields of
  `gist_scale.config` with values its own parser (`_from_cli`) accepts. A command without placeholders is also
  loaded whole with `load_config` (recipe and `--config` files included, a config file the docs define in a yaml
  block standing in for the file). The launchers' own options go through accelerate's and torchrun's parsers;
  `launch/local_multi_gpu.sh` is run with `--dry-run`.
- Fenced ```yaml blocks are `--config` files (unless the first line says `not a config`) and must load with
  `load_config`, unknown sections and fields failing.
- Python snippets compile and their `gist_scale` imports resolve; `--section.key` options named anywhere in the text
  exist; relative links point to existing files and headings; repository paths in code exist.

Placeholders (`MODEL`, `OUT_DIR`, `N`, `...`, `$VAR`) are fine: option names are always checked, values only where
they are real.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import glob
import importlib
import io
import re
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
YAML_LANGS = {"yaml", "yml"}
CONFIG_COMMANDS = {"train", "mine", "cache-guide", "calibrate"}  # built on gist_scale.options.job_parser: every config field
NOT_A_CONFIG = "not a config"  # a yaml block whose first line says this is not checked as a --config file

README_INSTALL = ('python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt torch==2.13.0 '
                  '-e ".[dev]" && gist-scale train')
README_TEST = "python -m pytest -q -n 2 --dist worksteal"
DOC_PAGES = ["README.md", "getting-started.md", "data.md", "models.md", "loss.md", "calibration.md", "launching.md",
             "evaluation.md", "performance.md", "troubleshooting.md", "development.md", "ablation.md"]


# ----------------------------------------------------------------------------------------------------------------
# Reading the docs


@dataclasses.dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # 1-based line of the opening fence
    lang: str
    text: str


@dataclasses.dataclass(frozen=True)
class Command:
    doc: str
    line: int
    tokens: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{' '.join(self.tokens)[:60]}"


FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")


def fenced_blocks(doc: str, text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text (also those indented inside list items)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and not lines[j].strip().strip(fence[0])):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        assert j < len(lines), f"{doc}:{i + 1}: unclosed code fence"
        blocks.append(Block(doc, i + 1, match["lang"].lower(), "\n".join(body)))
        i = j + 1
    return blocks


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    out, inside, fence = [], False, ""
    for line in text.splitlines():
        match = FENCE.match(line)
        if match and (not inside or (line.strip().startswith(fence) and not line.strip().strip(fence[0]))):
            inside, fence = (not inside), match["fence"]
            continue
        if not inside:
            out.append(line)
    return "\n".join(out)


def strip_comments(text: str) -> str:
    """Drop shell comments: an unquoted `#` at the start of a word, to the end of its line."""
    out, quote, i = [], None, 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\" and quote == '"':
                out.append(text[i:i + 2])
                i += 2
                continue
            if char == quote:
                quote = None
        elif char == "\\":
            out.append(text[i:i + 2])
            i += 2
            continue
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        out.append(char)
        i += 1
    return "".join(out)


def lex(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", ">&", "&>"}


def shell_commands(block: Block) -> list[Command]:
    """The simple commands of a shell block, each with the line it starts on."""
    lines = block.text.split("\n")
    if block.lang == "console":  # only the `$ ` lines (and their continuations) are commands; the rest is output
        kept, continued = [], False
        for line in lines:
            if continued or line.startswith("$ "):
                kept.append(line if continued else line[2:])
                continued = line.rstrip().endswith("\\")
            else:
                kept.append("")
        lines = kept
    commands, buffer, start = [], "", None
    for number, line in enumerate(lines):
        if start is None:
            if not line.strip():
                continue
            start = number
        buffer += line + "\n"
        if line.rstrip().endswith("\\"):
            continue
        try:
            tokens = lex(strip_comments(buffer.replace("\\\n", "")))
        except ValueError:  # an open quote: the command goes on (python -c "...")
            continue
        simple: list[str] = []
        skip_next = False
        for token in tokens + [";"]:
            if skip_next:
                skip_next = False
            elif token in REDIRECTS:
                skip_next = True
            elif token in SEPARATORS:
                if simple:
                    commands.append(Command(block.doc, block.line + 1 + start, tuple(simple)))
                simple = []
            else:
                simple.append(token)
        buffer, start = "", None
    assert not buffer.strip(), f"{block.doc}:{block.line}: unterminated command {buffer!r}"
    return commands


ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def strip_prefix(tokens: tuple[str, ...]) -> tuple[str, ...]:
    """Without leading `NAME=value` assignments and `time`, `/usr/bin/time -v`, `env`, `exec`."""
    while tokens:
        if ENV_ASSIGNMENT.match(tokens[0]):
            tokens = tokens[1:]
        elif tokens[0] in ("time", "/usr/bin/time", "env", "exec"):
            tokens = tokens[1:]
            while tokens and tokens[0].startswith("-"):
                tokens = tokens[1:]
        else:
            return tokens
    return tokens


@dataclasses.dataclass
class Docs:
    """A set of Markdown texts (the real docs, or an edited copy of them) and what the tests read from them."""

    texts: dict[str, str]

    @classmethod
    def real(cls) -> Docs:
        return cls({str(p.relative_to(REPO)): p.read_text() for p in DOC_FILES})

    def blocks(self) -> list[Block]:
        return [b for doc, text in self.texts.items() for b in fenced_blocks(doc, text)]

    def commands(self) -> list[Command]:
        return [c for b in self.blocks() if b.lang in SHELL_LANGS for c in shell_commands(b)]

    def yaml_blocks(self) -> list[Block]:
        return [b for b in self.blocks() if b.lang in YAML_LANGS]

    def config_blocks(self) -> list[Block]:
        return [b for b in self.yaml_blocks() if NOT_A_CONFIG not in b.text.split("\n", 1)[0]]

    def config_files(self, doc: str) -> dict[str, str]:
        """Config files the docs define (`# NAME.yaml: ...` on the first line of a yaml block), those of `doc` first."""
        named = {}
        for block in sorted(self.config_blocks(), key=lambda b: b.doc == doc):
            match = re.match(r"#\s*([\w.-]+\.ya?ml)\b", block.text)
            if match:
                named[match[1]] = block.text
        return named

    def python_snippets(self) -> list[tuple[str, str]]:
        """(where, code) of every ```python block and every `python -c CODE` command."""
        snippets = [(f"{b.doc}:{b.line}", b.text) for b in self.blocks() if b.lang in ("python", "py")]
        for command in self.commands():
            tokens = strip_prefix(command.tokens)
            if tokens[:1] in (("python",), ("python3",)) and "-c" in tokens:
                snippets.append((f"{command.doc}:{command.line}", tokens[tokens.index("-c") + 1]))
        return snippets


# ----------------------------------------------------------------------------------------------------------------
# Checking commands against the real parsers

PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")


def is_placeholder(value: str) -> bool:
    return bool(PLACEHOLDER.fullmatch(value)) or "..." in value or "$" in value or value.startswith("<")


def sample_value(action: argparse.Action) -> str | None:
    """A value the action accepts, to stand in for a placeholder (`--num-negatives K`)."""
    if action.choices:
        return str(list(action.choices)[0])
    if action.type is None:
        return None
    for candidate in ("1", "1.0", "1-2", "1,2", "x"):
        try:
            action.type(candidate)
            return candidate
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
    return None


def fill_placeholders(parser: argparse.ArgumentParser, args: list[str]) -> tuple[list[str], bool]:
    """`args` with placeholder values of typed or choice options replaced by accepted ones; and whether any
    placeholder was there."""
    options = {s: a for a in parser._actions for s in a.option_strings}
    out, found, i = [], False, 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        action = options.get(name) if arg.startswith("-") else None
        takes_value = action is not None and action.nargs != 0
        if takes_value and eq:
            if is_placeholder(inline):
                found = True
                sample = sample_value(action)
                arg = f"{name}={sample}" if sample is not None else arg
            out.append(arg)
            i += 1
        elif takes_value and i + 1 < len(args):
            value = args[i + 1]
            if is_placeholder(value):
                found = True
                value = sample_value(action) or value
            out += [arg, value]
            i += 2
        else:
            found = found or (not arg.startswith("-") and is_placeholder(arg))
            out.append(arg)
            i += 1
    return out, found


def relax(parser: argparse.ArgumentParser) -> None:
    """Nothing required: for commands shown with `...` (options left out)."""
    for action in parser._actions:
        action.required = False
        if not action.option_strings and action.nargs is None:
            action.nargs = "?"


def parse(parser: argparse.ArgumentParser, args: list[str], known: bool, elided: bool
          ) -> tuple[argparse.Namespace | None, list[str], list[str], bool]:
    """Run the real parser: (namespace, unparsed extras, problems, placeholders seen). With `...` in the command,
    required options and positionals are not required. A missing required option is a problem, and the rest of the
    command is still parsed, so that its other problems are found too."""
    if elided:
        relax(parser)
    args, placeholders = fill_placeholders(parser, args)
    problems: list[str] = []
    for _ in range(2):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                if known:
                    namespace, extras = parser.parse_known_args(args)
                else:
                    namespace, extras = parser.parse_args(args), []
            return namespace, extras, problems, placeholders
        except SystemExit:
            lines = stderr.getvalue().strip().splitlines()
            problems.append(lines[-1] if lines else "argparse refused the arguments")
            if "the following arguments are required" not in problems[-1]:
                break
            relax(parser)
    return None, [], problems, placeholders


def check_job_command(parser, args: list[str], elided: bool, docs: Docs, doc: str) -> list[str]:
    """Problems of a command built on the config's parser (`gist_scale.options.parse_job`): the whole command parsed
    and its config built, as its `main` would, with placeholder values left out (their option must still exist) and
    a `--config` file taken from the repository or from the docs' YAML blocks (left out otherwise)."""
    from gist_scale.config import ConfigError
    from gist_scale.options import parse_job

    actions = {option: action for action in parser._actions for option in action.option_strings}
    kept, problems, placeholders, i = [], [], False, 0
    with tempfile.TemporaryDirectory() as tmp:
        while i < len(args):
            arg = args[i]
            name, eq, inline = arg.partition("=")
            action = actions.get(name) if arg.startswith("--") else None
            if action is None or action.nargs == 0 or name == "--debug":
                if action is None and arg.startswith("--"):  # unknown: the parser names it, with the closest match
                    kept += [arg] if eq else args[i:i + 2]
                    i += 1 if eq else 2
                    continue
                kept += ["--debug", "true"] if arg == "--debug" else [arg]
                placeholders = placeholders or (not arg.startswith("-") and is_placeholder(arg))
                i += 1
                continue
            value = inline if eq else args[i + 1] if i + 1 < len(args) else None
            i += 1 if eq else 2
            if value is None:
                problems.append(f"{name}: missing value")
            elif is_placeholder(value):
                placeholders = True
            elif name == "--config":
                if (REPO / value).is_file():
                    kept += [name, str(REPO / value)]
                elif Path(value).name in docs.config_files(doc):
                    path = Path(tmp) / Path(value).name
                    path.write_text(docs.config_files(doc)[Path(value).name])
                    kept += [name, str(path)]
            else:
                kept += [name, value]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                if elided or placeholders:  # options and their types only: the config is not whole
                    parser.parse_args(kept)
                else:
                    parse_job(parser, kept)
        except argparse.ArgumentError as error:
            if not (elided and "required" in str(error)):
                problems.append(" ".join(str(error).split()))
        except ConfigError as error:
            problems.append(str(error))
    return problems


@functools.cache  # one parser per command for the whole module: building one reads every config docstring (~0.4 s)
def build_parser(command: str) -> argparse.ArgumentParser:
    from gist_scale.cli import COMMANDS

    return importlib.import_module(COMMANDS[command][0]).build_parser()


def check_gist(args: list[str], docs: Docs, doc: str) -> list[str]:
    """Problems of `gist-scale ARGS` (the subcommand and its arguments)."""
    from gist_scale.cli import COMMANDS

    if not args or args[0] in ("-h", "--help"):
        return []
    command, rest = args[0], [a for a in args[1:] if a != "..."]
    elided = "..." in args[1:]
    if command not in COMMANDS:
        return [f"unknown command {command!r}; gist_scale/cli.py knows {', '.join(COMMANDS)}"]
    parser = build_parser(command)
    if command in CONFIG_COMMANDS:
        return check_job_command(parser, rest, elided, docs, doc)
    namespace, extras, problems, placeholders = parse(parser, rest, False, elided)
    if namespace is None:
        return problems
    placeholders = placeholders or bool(problems)  # no whole load of a command already refused
    if command == "recipes" and namespace.name is not None and not is_placeholder(namespace.name):
        from gist_scale.config import ConfigError
        from gist_scale.recipes import recipe_path

        try:
            recipe_path(namespace.name)
        except ConfigError as error:
            problems.append(str(error))
    elif command == "bench" and not (placeholders or elided):
        # The bench's own front-end also checks modes, model sizes and batch sizes.
        from gist_scale.tools.bench import parse_args

        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parse_args(rest)
        except SystemExit:
            problems.append(stderr.getvalue().strip().splitlines()[-1])
    return problems


def check_launcher(parser: argparse.ArgumentParser, args: list[str], docs: Docs, doc: str) -> list[str]:
    """`accelerate launch ARGS` / `torchrun ARGS`: the launcher's own parser, then the gist-scale tail."""
    namespace, _, problems, _ = parse(parser, [a for a in args if a != "..."], known=False, elided="..." in args)
    if namespace is None:
        return problems
    if not namespace.module:
        return [f"runs {namespace.training_script!r} as a script; gist-scale is started with -m gist_scale"]
    if namespace.training_script != "gist_scale":
        return [f"-m {namespace.training_script}: not gist_scale"]
    return check_gist(list(namespace.training_script_args), docs, doc)


def check_command(command: Command, docs: Docs) -> tuple[str | None, list[str]]:
    """(what kind of gist-scale command this is, or None for any other command; its problems)."""
    tokens = strip_prefix(command.tokens)
    if not tokens:
        return None, []
    head, args = tokens[0], list(tokens[1:])
    if head == "gist-scale":
        return "gist-scale", check_gist(args, docs, command.doc)
    if head in ("python", "python3") and args[:1] == ["-m"] and len(args) > 1:
        module, rest = args[1], args[2:]
        if module == "gist_scale":
            return "python -m gist_scale", check_gist(rest, docs, command.doc)
        if module.startswith("gist_scale."):
            try:
                parser = importlib.import_module(module).build_parser()
            except (ImportError, AttributeError) as error:
                return "python -m gist_scale.*", [f"-m {module}: {error}"]
            return "python -m gist_scale.*", parse(parser, rest, False, "..." in rest)[2]
        return None, []
    if head == "accelerate" and args[:1] == ["launch"]:
        from accelerate.commands.launch import launch_command_parser

        return "accelerate launch", check_launcher(launch_command_parser(), args[1:], docs, command.doc)
    if head == "torchrun":
        from torch.distributed.run import get_args_parser

        return "torchrun", check_launcher(get_args_parser(), args, docs, command.doc)
    if head == "launch/local_multi_gpu.sh":
        # The script itself says what it would run.
        extra = [] if any(a == "--gpus" or a.startswith("--gpus=") for a in args) else ["--gpus", "1"]
        result = subprocess.run(["bash", str(REPO / head), "--dry-run", *extra, *args], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            return "launch script", [result.stderr.strip() or f"exit code {result.returncode}"]
        launched = shlex.split(result.stdout)
        from accelerate.commands.launch import launch_command_parser

        return "launch script", check_launcher(launch_command_parser(), launched[2:], docs, command.doc)
    if head == "launch/single_gpu_debug.sh":
        assert "-m gist_scale train" in (REPO / head).read_text()
        return "launch script", check_gist(["train", *args], docs, command.doc)
    if head == "sbatch":
        script = next((i for i, a in enumerate(args) if a.endswith("launch/slurm_multinode.sbatch")), None)
        if script is None:
            return None, []
        assert "-m gist_scale train" in (REPO / "launch/slurm_multinode.sbatch").read_text()
        return "sbatch", check_gist(["train", *args[script + 1:]], docs, command.doc)
    return None, []


def check_python(code: str) -> list[str]:
    """A snippet compiles, and every name it imports from gist_scale exists."""
    try:
        tree = ast.parse(code)
    except SyntaxError as error:
        return [f"does not compile: {error}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gist_scale":
            module = importlib.import_module(node.module)
            problems += [f"{node.module} has no {a.name}" for a in node.names if not hasattr(module, a.name)]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gist_scale":
                    try:
                        importlib.import_module(alias.name)
                    except ImportError as error:
                        problems.append(str(error))
    return problems


def check_yaml(block: Block) -> list[str]:
    from gist_scale.config import ConfigError
    from gist_scale.options import load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(block.text)
        try:
            load_config([], path)
        except ConfigError as error:
            return [str(error)]
    return []


def problems_of(docs: Docs) -> dict[str, list[str]]:
    """Every command and config of `docs` with problems, by where it is."""
    found = {}
    for command in docs.commands():
        _, problems = check_command(command, docs)
        if problems:
            found[command.id] = problems
    for block in docs.config_blocks():
        problems = check_yaml(block)
        if problems:
            found[f"{block.doc}:{block.line}"] = problems
    return found


# ----------------------------------------------------------------------------------------------------------------
# The tests

DOCS = Docs.real()


def gist_commands(docs: Docs) -> list[tuple[Command, str]]:
    """The commands that are gist-scale commands, with their kind (no parsing: by their first words)."""
    out = []
    for command in docs.commands():
        tokens = strip_prefix(command.tokens)
        head, rest = (tokens[0], tokens[1:]) if tokens else ("", ())
        if head == "gist-scale":
            out.append((command, "gist-scale"))
        elif head in ("python", "python3") and rest[:2] and rest[0] == "-m" and rest[1].startswith("gist_scale"):
            out.append((command, "python -m gist_scale"))
        elif head in ("accelerate", "torchrun") and "gist_scale" in rest:
            out.append((command, head))
        elif head in ("launch/local_multi_gpu.sh", "launch/single_gpu_debug.sh"):
            out.append((command, "launch script"))
        elif head == "sbatch" and any(t.endswith("launch/slurm_multinode.sbatch") for t in rest):
            out.append((command, "sbatch"))
    return out


GIST_COMMANDS = gist_commands(DOCS)


@pytest.mark.parametrize("command", [c for c, _ in GIST_COMMANDS], ids=lambda c: c.id)
def test_docs_command_parses(command: Command) -> None:
    kind, problems = check_command(command, DOCS)
    assert kind is not None
    assert problems == [], f"{command.doc}:{command.line}: {' '.join(command.tokens)}\n" + "\n".join(problems)


@pytest.mark.parametrize("block", DOCS.config_blocks(), ids=lambda b: f"{b.doc}:{b.line}")
def test_docs_yaml_config_loads(block: Block) -> None:
    assert check_yaml(block) == []


def test_docs_cover_every_command_and_layout() -> None:
    from gist_scale.cli import COMMANDS as CLI_COMMANDS

    kinds = [kind for _, kind in GIST_COMMANDS]
    subcommands = set()
    for command, _ in GIST_COMMANDS:
        tokens = list(strip_prefix(command.tokens))
        if "gist_scale" in tokens:
            tokens = tokens[tokens.index("gist_scale"):]
        elif tokens[0] in ("launch/local_multi_gpu.sh", "launch/single_gpu_debug.sh", "sbatch"):
            tokens = ["gist-scale", "train"]
        if len(tokens) > 1:
            subcommands.add(tokens[1])
    assert set(CLI_COMMANDS) <= subcommands, f"no example of {set(CLI_COMMANDS) - subcommands}"
    for kind in ("gist-scale", "python -m gist_scale", "accelerate", "torchrun", "launch script", "sbatch"):
        assert kind in kinds, f"no {kind} example"
    assert len(GIST_COMMANDS) >= 60, len(GIST_COMMANDS)
    assert len(DOCS.config_blocks()) >= 4
    # every yaml block is either a config or says it is not one
    assert all(b in DOCS.config_blocks() or NOT_A_CONFIG in b.text.split("\n", 1)[0] for b in DOCS.yaml_blocks())


def test_no_command_escapes_the_check_by_a_misspelled_name() -> None:
    """A command that looks like gist-scale but is spelled otherwise would not be checked: refuse it."""
    for command in DOCS.commands():
        tokens = strip_prefix(command.tokens)
        assert "gist" not in tokens[0] or tokens[0] == "gist-scale", command.id
        for flag, module in zip(tokens, tokens[1:]):
            if flag == "-m" and "gist" in module:
                assert module == "gist_scale" or module.startswith("gist_scale."), command.id


def test_readme_keeps_the_two_commands_that_ci_runs() -> None:
    readme = DOCS.texts["README.md"]
    blocks = [b.text.strip() for b in fenced_blocks("README.md", readme) if b.lang == "bash"]
    assert README_INSTALL in blocks and README_TEST in blocks
    ci = (REPO / ".ci/run").read_text()
    assert 'pip install -q -c constraints.txt torch==2.13.0 -e ".[dev]"' in ci
    assert f"\n{README_TEST}\n" in ci
    assert len(readme.splitlines()) <= 150, "README.md is the three-minute read; details go to docs/"


def test_docs_pages_exist_and_keep_the_exactness_contract_heading() -> None:
    assert sorted(DOC_PAGES) == sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert "\n## Exactness contract\n" in DOCS.texts["docs/loss.md"]


BAD_COMMANDS = {
    "gist-scale train --train.batchsize 8": "batchsize",
    "gist-scale mine --no-such-flag": "no-such-flag",
    "gist-scale mine --no-such-flag --out triplets.jsonl": "no-such-flag",
    "gist-scale trian": "trian",
    "gist-scale train --trian.batch_size 8": "trian",
    "gist-scale train --train.mixed_precision fp8": "fp8",
    "gist-scale train --train.batch_size eight": "eight",
    "gist-scale train --recipe no-such-recipe": "no-such-recipe",
    "gist-scale train --data.sources '[{path: a.jsonl, wieght: 1}]'": "wieght",
    "gist-scale eval MODEL --no-such-option": "no-such-option",
    "gist-scale eval MODEL --dims 0": "--dims",
    "gist-scale mine --sampling best --out triplets.jsonl": "best",
    "gist-scale cache-guide OUT_DIR --guide.nmae BAAI/bge-base-en-v1.5": "nmae",
    "gist-scale bench --cases tiny --modes plain,turbo": "turbo",
    "gist-scale recipes no-such-recipe": "no-such-recipe",
    "gist-scale data wordnett OUT_DIR": "wordnett",
    "gist-scale report RUN_DIR --png out.png": "--png",
    "python -m gist_scale train --train.batchsize 8": "batchsize",
    "python -m gist_scale.tools.data_memory --rows 10 --no-tokenise": "--no-tokenise",
    "accelerate launch --config_file accelerate_configs/zero2.yaml -m gist_scale train --train.batchsize 8":
        "batchsize",
    "accelerate launch --no_such_launcher_option 1 -m gist_scale train": "no_such_launcher_option",
    "torchrun --nproc_per_node 2 -m gist_scale trian": "trian",
    "launch/local_multi_gpu.sh --gpus 8 --zero 4 --config my_run.yaml": "--zero 4",
    "launch/local_multi_gpu.sh --gpus 8 --train.batchsize 8": "batchsize",
    "launch/single_gpu_debug.sh --train.batchsize 8": "batchsize",
    "RUN_DIR=runs/x sbatch --nodes=4 launch/slurm_multinode.sbatch --train.batchsize 8": "batchsize",
}


@pytest.mark.parametrize("text", BAD_COMMANDS)
def test_checker_rejects_unknown_commands_options_and_values(text: str) -> None:
    command = shell_commands(Block("bad.md", 1, "bash", text))
    assert len(command) == 1
    kind, problems = check_command(command[0], DOCS)
    assert kind is not None and problems, f"accepted: {text}"
    assert BAD_COMMANDS[text] in " ".join(problems), problems


@pytest.mark.parametrize("text", [
    "data:\n  path: a.jsonl\ntrain:\n  batchsize: 8\n",
    "trian:\n  batch_size: 8\n",
    "data:\n  sources:\n    - {path: a.jsonl, wieght: 1}\n",
    "train:\n  mixed_precision: fp8\n",
])
def test_checker_rejects_bad_yaml_configs(text: str) -> None:
    assert check_yaml(Block("bad.md", 1, "yaml", text))


def test_a_renamed_option_in_a_copy_of_the_docs_is_caught() -> None:
    """Rename an option and a config key everywhere in a copy of the docs, as a code change would leave them: every
    command and config that used them fails, and nothing else."""
    assert problems_of(DOCS) == {}
    copy = Docs({doc: text.replace("--train.batch_size", "--train.batchsize").replace("batch_size: 32",
                                                                                      "batchsize: 32")
                 for doc, text in DOCS.texts.items()})
    using_option = [c for c in DOCS.commands() if any(t.startswith("--train.batch_size") for t in c.tokens)]
    using_key = [f"{b.doc}:{b.line}" for b in DOCS.config_blocks() if "batch_size: 32" in b.text]
    assert using_option and using_key
    found = problems_of(copy)
    renamed = [c for c in copy.commands() if any(t.startswith("--train.batchsize") for t in c.tokens)]
    caught = {c.id for c in renamed} | set(using_key)
    assert len(caught) == len(using_option) + len(using_key) and caught <= set(found), sorted(caught - set(found))
    # the rest: commands that read one of those config files with --config
    assert all("batchsize" in " ".join(p) for p in found.values())
    assert any("--config" in key for key in set(found) - caught)
    # and a renamed command
    copy = Docs({doc: re.sub(r"\b(gist-scale|gist_scale) mine\b", r"\1 mines", text)
                 for doc, text in DOCS.texts.items()})
    mining = sum("mine" in c.tokens for c in DOCS.commands())
    assert mining >= 3 and len(problems_of(copy)) == mining


@pytest.mark.parametrize("code", [pytest.param(code, id=where) for where, code in DOCS.python_snippets()])
def test_docs_python_snippets_compile_and_import(code: str) -> None:
    assert check_python(code) == []


OPTION = re.compile(r"--([a-z_]+)\.([a-z0-9_]+)")


def test_every_config_option_named_in_the_docs_exists() -> None:
    from gist_scale.config import SECTIONS

    unknown = []
    for doc, text in DOCS.texts.items():
        for match in OPTION.finditer(text):
            section, key = match.groups()
            if section in SECTIONS and key not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
                unknown.append(f"{doc}: {match[0]}")
    assert unknown == []


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match[1])
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def test_relative_links_point_to_existing_files_and_headings() -> None:
    broken, count = [], 0
    for doc, text in DOCS.texts.items():
        for target in LINK.findall(prose(text)):
            if re.match(r"^[a-z]+:", target):
                continue
            count += 1
            file_part, _, anchor = target.partition("#")
            path = (REPO / doc).parent / file_part if file_part else REPO / doc
            if not path.exists():
                broken.append(f"{doc}: {target}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
                broken.append(f"{doc}: {target}: no such heading")
    assert count >= 100 and broken == []


REPO_PATH = re.compile(r"^(?:gist_scale|tests|launch|accelerate_configs|ds_configs|docs|\.ci)/[\w./*-]*$")


def repo_paths(docs: Docs) -> Iterator[tuple[str, str]]:
    for doc, text in docs.texts.items():
        for span in re.findall(r"`([^`\n]+)`", prose(text)):
            for word in re.split(r"[\s,()=]+", span):
                yield doc, word
        for command in docs.commands():
            if command.doc == doc:
                for token in command.tokens:
                    yield doc, token.partition("=")[2] if ENV_ASSIGNMENT.match(token) else token


def test_repository_paths_in_the_docs_exist() -> None:
    missing, count = [], 0
    for doc, word in repo_paths(DOCS):
        word = word.strip("'\".:;")
        if not REPO_PATH.match(word) or any(PLACEHOLDER.fullmatch(Path(p).stem) for p in word.split("/")):
            continue
        count += 1
        if not glob.glob(str(REPO / word)):
            missing.append(f"{doc}: {word}")
    assert count >= 50 and missing == []
