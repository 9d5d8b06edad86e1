"""Where the rows come from: `data.path` or a mixture source resolved to its parts (local files, a folder's files
for a split, a hub dataset), each readable whole (`Part.load`) or as a stream (`Part.stream`), and the one-line
error when a file cannot be read."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

from gist_scale.config import DataConfig, SourceConfig
from gist_scale.data.errors import DataError
from gist_scale.places import text_file_problem

__all__ = ["FORMATS", "SAMPLE_SPLITS", "Part", "read_local_file", "resolve", "sample_data_path"]

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""Local file suffix -> `datasets` packaged loader."""
SAMPLE_SPLITS = ("train", "eval")
_SPLIT_WORDS = {"train": "train", "training": "train", "eval": "eval", "evaluation": "eval", "test": "test",
                "testing": "test", "validation": "validation", "valid": "validation", "val": "validation",
                "dev": "validation"}
"""Split names recognised in a folder's file and directory names, with their synonyms."""


def sample_data_path(split: str) -> Path:
    """The shipped WordNet sample's `train` or `eval` JSONL (see `gist_scale/sample_data/wordnet/README.md`)."""
    if split not in SAMPLE_SPLITS:
        raise DataError(f"the shipped sample has no split {split!r}: use one of {', '.join(SAMPLE_SPLITS)}")
    return Path(str(resources.files("gist_scale") / "sample_data" / "wordnet" / f"{split}.jsonl"))


@dataclass(frozen=True)
class Part:
    """One unit that is loaded and validated on its own, so errors can name its file and row."""

    where: str
    """File path or hub description, the prefix of every error message about its rows."""
    load: Callable[[], datasets.Dataset]
    """Reads the raw rows (deferred, so a hub download starts only when this part is validated)."""
    jsonl: bool
    """Rows are JSON lines read as text: rows are numbered as lines, and decoded in the validation map."""
    stream: Callable[[], datasets.IterableDataset]
    """Opens the same raw rows as a `datasets.IterableDataset`, read only as it is iterated (`data.streaming`)."""
    failure: Callable[[Exception], DataError]
    """The one-line `DataError` for an exception its reader raises (what and why), for errors met while streaming."""


def _split_word(name: str) -> str | None:
    """The split a file or folder name announces (`train.jsonl`, `eval-00001.parquet`, `validation/`), if any."""
    word = re.split(r"[-_. 0-9]", name.lower(), maxsplit=1)[0]
    return _SPLIT_WORDS.get(word)


def _folder_files(folder: Path, split: str) -> list[Path]:
    """The folder's data files for `split`: those named after it when any file names a split, else all of them."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: no {'/'.join(sorted(FORMATS))} files in this folder")
    named = {p: next((w for part in p.relative_to(folder).parts if (w := _split_word(part))), None) for p in files}
    wanted = _SPLIT_WORDS.get(split.lower(), split.lower())
    if any(named.values()):
        files = [p for p in files if named[p] == wanted]
        if not files:
            found = ", ".join(sorted({w for w in named.values() if w}))
            raise DataError(f"{folder}: no files for split {split!r} (its files are named for: {found}); "
                            "set --data.split to one of those")
    kinds = {FORMATS[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise DataError(f"{folder}: mixes {' and '.join(sorted(kinds))} files; point --data.path at one kind")
    return files


def _is_json_lines(path: Path) -> bool:
    """JSONL, or a `.json` file holding JSON lines rather than one JSON document (an array)."""
    suffix = path.suffix.lower()
    if suffix != ".json":
        return suffix == ".jsonl"
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    return not head.startswith(b"[")


def _local_part(path: Path) -> Part:
    """One file read with `datasets`' loader; JSON lines as text, so a malformed line cannot stop the reader."""
    jsonl = _is_json_lines(path)
    builder = "text" if jsonl else FORMATS[path.suffix.lower()]
    kind = "JSON lines" if jsonl else builder
    return Part(str(path), lambda: read_local_file(path, builder, str(path), kind), jsonl,
                lambda: datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True),
                lambda error: _read_failure(path, builder, str(path), kind, error))


def read_local_file(path: Path, builder: str, label: str, kind: str) -> datasets.Dataset:
    """One local file through `datasets`' packaged loader `builder` (`json`, `csv`, `parquet`, `text`).

    A failure is a `DataError` starting with `label` that says why: an empty file, a byte that is not UTF-8 (with
    its line), or the reader's own reason, which `datasets` hides behind "An error occurred while generating the
    dataset".
    """
    verbosity = datasets.logging.get_verbosity()
    # The readers log their failure before raising it; the one line we raise says it better.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # the loaders raise many types (ArrowInvalid, ParserError, UnicodeDecodeError...)
        raise _read_failure(path, builder, label, kind, error) from error
    finally:
        datasets.logging.set_verbosity(verbosity)


def _read_failure(path: Path, builder: str, label: str, kind: str, error: Exception) -> DataError:
    return DataError(f"{label}: cannot read as {kind}: {_read_problem(path, builder, error)}")


def _read_problem(path: Path, builder: str, error: Exception) -> str:
    """Why a reader failed on `path`, with the fix where it is known. Reads the file: only on the error path."""
    problem = text_file_problem(path) if builder != "parquet" else None
    if problem == "empty file" or (problem is None and builder == "csv" and _is_header_only(path)):
        return f"{problem or 'a header but no rows'}; give a file with rows"
    if problem is not None:
        return f"{problem}; save it as UTF-8"
    if isinstance(error, DatasetGenerationError) and error.__cause__ is not None:
        error = error.__cause__  # the reader's own error: a CSV line with too many fields, bad JSON ...
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_header_only(path: Path) -> bool:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip()) <= 1


def resolve(cfg: DataConfig, split: str, source: SourceConfig | None = None) -> tuple[str, list[Part]]:
    """The description and parts of `data.path` (unset: the shipped sample), or of a mixture source, whose own
    path, revision and split are read instead."""
    if source is not None:
        split = source.split or split
        cfg = dataclasses.replace(cfg, path=source.path, revision=source.revision, sources=[])
    if cfg.path is None:
        path = sample_data_path(split)
        return f"WordNet sample {split} ({path})", [_local_part(path)]
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        files = _folder_files(path, split)
        description = f"{path} ({len(files)} file{'s' * (len(files) > 1)}, split {split})"
    elif path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(sorted(FORMATS))}")
        files, description = [path], str(path)
    elif path.suffix.lower() in FORMATS or cfg.path.startswith((".", "/", "~")):
        raise DataError(f"--data.path {cfg.path}: no such file or folder")
    else:
        where = f"{cfg.path}@{cfg.revision or 'main'}[{split}]"

        def hub_failure(error: Exception) -> DataError:  # network, authentication, unknown split: all end alike
            return DataError(f"cannot load hub dataset {where}: {error}; for local data give an existing file or "
                             "folder as --data.path")

        def load_hub(**streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
            try:
                return datasets.load_dataset(cfg.path, revision=cfg.revision, split=split, **streaming)
            except Exception as error:
                raise hub_failure(error) from error

        return f"hub dataset {where}", [Part(where, load_hub, False, lambda: load_hub(streaming=True), hub_failure)]
    return description, [_local_part(file) for file in files]
