"""The command line from the typed config (`gist_scale.options`): every field in `--help` with its doc, the
precedence of defaults, recipe, config files and flags, a frozen result, and the commands that share the sections."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import textwrap
from pathlib import Path

import pytest

from gist_scale.config import SECTIONS, ConfigError, JobConfig
from gist_scale.options import load_config
from gist_scale.recipes import recipe_path


def help_text(command: str) -> str:
    from gist_scale.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def doc_words(cls: type, name: str) -> list[str]:
    """The first words of a field's attribute docstring, as `--help` wraps them."""
    import docstring_parser

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):  # a subclass's own doc of a field wins (ModelConfig.name)
        docs.update({p.arg_name: p.description for p in docstring_parser.parse_from_object(klass).params
                     if p.description})
    assert docs.get(name), f"{cls.__name__}.{name} has no doc"
    return docs[name].split()[:6]


def option_help(text: str, option: str) -> str:
    """The help entry of `option`: from its line to the next option, whitespace collapsed."""
    match = re.search(rf"^\s+{re.escape(option)}(?=[\s,]).*?(?=^\s+--|\Z)", text, re.M | re.S)
    assert match, f"{option} is not in --help"
    return " ".join(match.group(0).split())


@pytest.mark.parametrize("command", ["train", "cache-guide", "mine"])
def test_help_lists_every_config_field_with_its_doc_type_and_default(command: str) -> None:
    text = help_text(command)
    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            entry = option_help(text, f"--{section}.{field.name}")
            assert " ".join(doc_words(cls, field.name)) in entry, (section, field.name, entry)
            assert "(type: " in entry and "default: " in entry, entry
    for field in dataclasses.fields(JobConfig):
        if field.name not in SECTIONS:
            assert " ".join(doc_words(JobConfig, field.name)) in option_help(text, f"--{field.name}")
    assert "--recipe" in text and "--config" in text


def test_help_shows_choices_and_the_commands_own_options() -> None:
    text = help_text("train")
    assert "--train.mixed_precision {no,bf16,fp16}" in text and "--dry-run" in text
    assert "--out" in help_text("mine") and "OUT_DIR" in help_text("cache-guide")


def test_a_loaded_config_is_frozen() -> None:
    cfg = load_config(["--train.batch_size", "4", "--data.neg_columns", "[a, b]"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.batch_size = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = cfg.train  # type: ignore[misc]
    assert cfg.data.neg_columns == ("a", "b")  # a tuple: no list to append to either


def test_precedence_is_flags_over_config_files_over_the_recipe_over_defaults(tmp_path: Path) -> None:
    first = tmp_path / "first.yaml"
    first.write_text("train:\n  epochs: 3\n  log_every: 7\noptim:\n  lr: 3.0e-5\n")
    second = tmp_path / "second.yaml"
    second.write_text("train:\n  epochs: 4\n")
    # --config placed after the flag still yields to it: flags win whatever their position.
    cfg = load_config(["--recipe", "gist-small-repro", "--optim.lr", "1e-6", "--config", str(first),
                       "--config", str(second)])
    assert (cfg.optim.lr, cfg.train.epochs, cfg.train.log_every) == (1e-6, 4, 7)
    recipe = load_config(["--recipe", "gist-small-repro"])
    assert recipe.model.name != JobConfig().model.name or recipe.train != JobConfig().train  # the recipe applied
    assert load_config([]) == JobConfig()


def test_values_are_yaml_negative_numbers_and_a_bare_debug_work() -> None:
    cfg = load_config(["--optim.betas", "[0.8, 0.9]", "--train.max_steps", "null", "--loss.margin", "-0.05",
                       "--optim.weight_decay=0", "--debug"])
    assert (cfg.optim.betas, cfg.train.max_steps, cfg.loss.margin, cfg.debug) == ((0.8, 0.9), None, -0.05, True)
    with pytest.raises(ConfigError, match=r"optim.lr=-1e-05: must be > 0"):
        load_config(["--optim.lr", "-1e-5"])


@pytest.mark.parametrize("argv, message", [
    (["--train.batch_size", "two"], "--train.batch_size='two': expected int"),
    (["--train.batchsize", "2"], "unknown option '--train.batchsize'; did you mean '--train.batch_size'?"),
    (["--data.sources", "[{path: a.jsonl, wieght: 2}]"], "'wieght'; did you mean 'weight'?"),
    (["--train.mixed_precision", "fp8"], "expected one of no, bf16, fp16"),
    (["--data.sources", "[{path: a.jsonl, false_negatives: drop}]"],
     "--data.sources entry's false_negatives='drop': expected one of mask, relabel or null"),
])
def test_bad_values_are_one_line_naming_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_bad_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent("""\
        train:
          batchsize: 2
    """))
    with pytest.raises(ConfigError, match=rf"unknown key in {re.escape(str(config))} section 'train': 'batchsize'; "
                                          r"did you mean 'batch_size'\?"):
        load_config(["--config", str(config)])
    config.write_text("trian:\n  batch_size: 2\n")
    with pytest.raises(ConfigError, match=r"unknown section in .*run.yaml: 'trian'; did you mean 'train'\?"):
        load_config(["--config", str(config)])


def test_a_saved_config_reads_back_equal(tmp_path: Path) -> None:
    from gist_scale.config import save_config

    cfg = load_config(["--recipe", "gist-small-repro", "--data.sources", "[{path: a.jsonl, weight: 2}]",
                       "--data.path", "null", "--loss.matryoshka_dims", "[64, 32]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(["--config", str(tmp_path / "config.yaml")]) == cfg
    assert recipe_path("gist-small-repro").is_file()


def test_a_commands_own_option_is_named_as_spelt(capsys: pytest.CaptureFixture[str]) -> None:
    from gist_scale.tools.mine import main as mine

    assert mine(["--out", "x.jsonl", "--num-negatives", "abc"]) == 2
    assert "error: --num-negatives='abc': expected int" in capsys.readouterr().err
