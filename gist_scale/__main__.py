"""`python -m gist_scale ...` is the same as the `gist-scale` command."""

from gist_scale.cli import run

raise SystemExit(run())
