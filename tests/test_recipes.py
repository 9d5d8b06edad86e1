"""Shipped recipes (gist_scale/recipes/*.yaml): every one resolves to a valid configuration, without downloading or
training, so none can rot; `gist-scale recipes` lists them and `train --recipe` applies them under the flags."""

from __future__ import annotations

import pytest

from gist_scale.cli import main as cli
from gist_scale.options import load_config
from gist_scale.recipes import list_recipes, recipe_path

RECIPES = ["gist-small-repro", "qwen3-embedding-0.6b-full", "qwen3-embedding-8b-lora"]


def test_every_shipped_recipe_is_tested():
    assert sorted(list_recipes()) == sorted(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves(name):
    """Every key is a known, valid field (the same checks as `gist-scale train --recipe NAME`), and each recipe
    says how to launch it."""
    cfg = load_config([], recipe_path(name))
    assert "launch" in recipe_path(name).read_text().lower() or "gist-scale train" in recipe_path(name).read_text()
    if name.startswith("qwen3"):
        assert cfg.model.pooling == "last_token" and "{instruction}" in cfg.model.query_prompt_template
        assert cfg.model.query_prompt.startswith("Instruct: ")
    if name == "qwen3-embedding-8b-lora":
        assert (cfg.model.lora_r, cfg.model.lora_alpha) == (16, 32)
        assert cfg.guide.cache is not None and cfg.train.grad_cache


def test_gist_small_repro_is_the_original_experiment():
    cfg = load_config([], recipe_path("gist-small-repro"))
    assert (cfg.model.name, cfg.model.pooling, cfg.model.normalize) == ("BAAI/bge-small-en-v1.5", "cls", True)
    assert cfg.guide.name == "WhereIsAI/UAE-Large-V1"
    assert (cfg.data.path, cfg.data.revision) == ("avsolatorio/medi-data-mteb-covid-bing-query-gpt4-avs_triplets",
                                                  "7612b607f896cbf5d769dbe838ac83ce0807056b")
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.max_steps) == (16, 40, None)
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.loss.temperature) == (5e-6, 0.1, 0.01)
    assert (cfg.model.max_length, cfg.train.mixed_precision, cfg.model.gradient_checkpointing) == (512, "bf16", True)
    assert "238a0499b6e6b690cc64ea56fde8461daa8341bb" in recipe_path("gist-small-repro").read_text()


def test_flags_and_config_override_a_recipe(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  batch_size: 8\n  epochs: 2\n")
    cfg = load_config(["--train.epochs", "3"], [recipe_path("gist-small-repro"), mine])
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.lr) == (8, 3, 5e-6)


def test_recipes_command_lists_prints_and_refuses_unknown_names(capsys):
    assert cli(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in RECIPES)
    assert cli(["recipes", "gist-small-repro"]) == 0
    assert capsys.readouterr().out == recipe_path("gist-small-repro").read_text()
    assert cli(["recipes", "gist-small"]) == 2
    assert "did you mean 'gist-small-repro'" in capsys.readouterr().err
    assert cli(["train", "--recipe", "qwen3-embedding-0.6b"]) == 2
    assert "no such recipe" in capsys.readouterr().err
