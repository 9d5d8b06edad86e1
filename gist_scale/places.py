"""Files and directories a command is given: what is wrong with them, found before anything heavy starts.

`require_writable_dir` is called before any model loads, so a run that could never save fails in a second instead
of after loading (or, worse, at its first checkpoint). `text_file_problem` names why a data file cannot be read
(empty, not UTF-8, with the line), after a reader failed with its own less useful message.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from gist_scale.config import ConfigError

__all__ = ["require_writable_dir", "require_writable_file", "text_file_problem"]


def require_writable_dir(path: str | Path, option: str) -> Path:
    """Create the output directory `path` if needed and write a probe file in it; `ConfigError` naming `option` and
    the reason when that fails. Returns the directory.

    A real write, not a permission-bit check: root ignores the bits, while a read-only file system, a full quota or
    a parent that is a file stop everyone. The probe file is removed again; an existing directory is not changed.
    """
    path = Path(path).expanduser()
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker == path:
        problem = f"{path} is a file, not a directory"
    elif blocker is not None:
        problem = f"{blocker} is a file, so {path} cannot be created"
    else:
        try:
            path.mkdir(parents=True, exist_ok=True)
            # Created, then removed by close: a file this process could write.
            tempfile.NamedTemporaryFile(dir=path, prefix=".gist-scale-write-test-").close()
            return path
        except OSError as error:
            problem = f"cannot write in {path}: {error.strerror or error}"
    raise ConfigError(f"{option}: {problem}; choose a directory you can write to")


def require_writable_file(path: str | Path, option: str) -> Path:
    """`require_writable_dir` for the file's directory, and the file itself must not be a directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{option}: {path} is a directory; give a file name (e.g. {path / 'metrics.json'})")
    require_writable_dir(path.parent, option)
    return path


def text_file_problem(path: str | Path) -> str | None:
    """`empty file` or `not UTF-8 text (line L, column C)` for a text file that no reader can use, else None.

    Reads the whole file, a line at a time; call it after a reader failed, to name the cause, not before every read.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        return "empty file"
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                where = f"line {number}, column {error.start + 1}"
                if error.reason == "unexpected end of data":  # only the last line can end inside a character
                    return f"not UTF-8 text ({where}: the file ends inside a character)"
                return f"not UTF-8 text ({where}: byte 0x{line[error.start]:02x})"
    return None
