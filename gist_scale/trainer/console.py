"""The trainer's console: stderr, so that stdout stays free for what a caller pipes."""

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)
