"""Ready training configurations shipped inside the package: `gist-scale recipes` lists them,
`gist-scale recipes NAME` prints one (to copy and edit), `gist-scale train --recipe NAME` runs one.

A recipe is an ordinary `--config` YAML file. It is applied first, then a user's `--config FILE`, then the flags:
`gist-scale train --recipe gist-small-repro --train.batch_size 32`.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from gist_scale.config import ConfigError

__all__ = ["list_recipes", "main", "recipe_path"]

_FOLDER = Path(__file__).parent
"""The recipes are this package's YAML files (package data)."""


def list_recipes() -> dict[str, str]:
    """Recipe name -> its first comment line (what it trains)."""
    return {path.stem: (path.read_text().splitlines() or [""])[0].lstrip("# ").strip()
            for path in sorted(_FOLDER.glob("*.yaml"))}


def recipe_path(name: str) -> Path:
    """The YAML file of recipe `name`; an unknown name fails with the closest one and the list."""
    path = _FOLDER / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        known = list(list_recipes())
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"--recipe {name}: no such recipe; {hint}known: {', '.join(known)} (`gist-scale recipes`)")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gist-scale recipes",
                                     description="List the shipped training recipes, or print one.")
    parser.add_argument("name", nargs="?", help="print this recipe's YAML")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.name is None:
        recipes = list_recipes()
        width = max(map(len, recipes))
        for name, description in recipes.items():
            print(f"{name:<{width}}  {description}")
        print("\nrun one: gist-scale train --recipe NAME [--section.key VALUE ...]; print one: gist-scale recipes NAME")
        return 0
    try:
        print(recipe_path(args.name).read_text(), end="")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
