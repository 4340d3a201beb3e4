"""The rt-polarity demo data: find the shared copy, or rebuild it from the ``vaderSentiment`` sdist.

rt-polarity is binary sentiment of Rotten Tomatoes review sentences, taken from the VADER gold set
that ships inside the ``vaderSentiment`` 3.3.2 source distribution on PyPI. The recipe, which
reproduces the project's shared files byte for byte:

1. ``python -m pip download --no-deps --no-binary :all: vaderSentiment==3.3.2``.
2. In the sdist, open ``additional_resources/hutto_ICWSM_2014.tar.gz`` and, inside it,
   ``movieReviewSnippets_GroundTruth.txt`` (UTF-8, CRLF lines, tab-separated: id, mean score, sentence).
3. In file order: parse the score with ``float``, drop rows whose score is 0, and drop a row whose
   sentence already appeared (the first one is kept). Label = 1 if score > 0 else 0.
4. Shuffle the remaining rows with ``random.Random(20261122).shuffle``; the first 1,000 are validation,
   the next 1,000 test, the rest (8,566) train.
5. Write each split as JSON lines ``{"text": ..., "label": ..., "score": ...}`` with ``json.dumps``
   defaults (ASCII escapes, the score as Python's shortest float repr, e.g. ``-0.0588235294118``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from aptune.data.errors import DataError

VADER_VERSION = "3.3.2"
"""The ``vaderSentiment`` release whose sdist holds the ground truth."""

SDIST_NAME = f"vaderSentiment-{VADER_VERSION}.tar.gz"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
GROUND_TRUTH_FILE = "movieReviewSnippets_GroundTruth.txt"
GROUND_TRUTH_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
"""SHA-256 of ``movieReviewSnippets_GroundTruth.txt`` in the 3.3.2 sdist, checked before building."""

SEED = 20261122
"""Seed of the ``random.Random`` that shuffles the rows before splitting."""

N_VALIDATION = 1000
N_TEST = 1000
SPLIT_SIZES = {"train": 8566, "validation": N_VALIDATION, "test": N_TEST}
"""Rows per split of the real data; a rebuild that gives other counts is an error."""

SPLIT_NAMES = ("train", "validation", "test")
SHARED_DATA_ENV = "APTUNE_SHARED_DATA"
"""Env var naming a ``shared/data`` folder (the one holding ``rt-polarity/``)."""

CACHE_ENV = "APTUNE_CACHE"
"""Env var naming aptune's cache root; rt-polarity lives in its ``rt-polarity`` subfolder."""


class RtPolarityFiles(NamedTuple):
    """Paths of the three rt-polarity JSON-lines files."""

    train: Path
    validation: Path
    test: Path


# ----------------------------------------------------------------------------------------------------
# Parsing and splitting (pure functions, tested offline)
# ----------------------------------------------------------------------------------------------------


def parse_ground_truth(text: str) -> list[dict[str, Any]]:
    """Parses the VADER movie-review ground truth into labelled rows, in file order.

    Each line is ``id<TAB>mean score<TAB>sentence``. Rows with score 0 are dropped (neutral), as is
    every repeat of a sentence already seen (the first occurrence is kept). Blank lines are skipped.

    Returns:
        Rows ``{"text": sentence, "label": 1 if score > 0 else 0, "score": score}``.

    Raises:
        DataError: for a line that does not have three tab-separated fields or a numeric score.
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise DataError(f"{GROUND_TRUTH_FILE}, line {line_number}: expected id, score and sentence")
        _, score_text, sentence = parts
        try:
            score = float(score_text)
        except ValueError:
            raise DataError(f"{GROUND_TRUTH_FILE}, line {line_number}: bad score {score_text!r}") from None
        sentence = sentence.strip()
        if score == 0 or sentence in seen:
            continue
        seen.add(sentence)
        rows.append({"text": sentence, "label": int(score > 0), "score": score})
    return rows


def split_rows(
    rows: Sequence[dict[str, Any]],
    *,
    seed: int = SEED,
    n_validation: int = N_VALIDATION,
    n_test: int = N_TEST,
) -> dict[str, list[dict[str, Any]]]:
    """Shuffles rows with ``random.Random(seed)`` and cuts validation, test, then train off the front.

    The input is not modified.
    """
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return {
        "train": shuffled[n_validation + n_test :],
        "validation": shuffled[:n_validation],
        "test": shuffled[n_validation : n_validation + n_test],
    }


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> None:
    """Writes rows as JSON lines (``json.dumps`` defaults), atomically: a temp file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Download and extraction
# ----------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where a rebuilt rt-polarity goes: ``$APTUNE_CACHE/rt-polarity``, default ``~/.cache/aptune/rt-polarity``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "aptune"
    return base / "rt-polarity"


def download_sdist(directory: Path) -> Path:
    """Downloads the ``vaderSentiment`` sdist into ``directory`` with pip (reused if already there).

    Raises:
        DataError: if pip fails (no network, no PyPI access, ...), with pip's last line of output.
    """
    sdist = directory / SDIST_NAME
    if sdist.is_file():
        return sdist
    directory.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--dest", str(directory), f"vaderSentiment=={VADER_VERSION}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not sdist.is_file():
        output = (result.stderr or result.stdout).strip().splitlines()
        reason = output[-1] if output else f"pip exited with status {result.returncode}"
        raise DataError(
            f"could not download vaderSentiment=={VADER_VERSION} from PyPI to rebuild rt-polarity "
            f"(no network?): {reason}"
        )
    return sdist


def read_ground_truth(sdist: Path) -> str:
    """Returns the text of ``movieReviewSnippets_GroundTruth.txt`` from the sdist, checking its SHA-256.

    Raises:
        DataError: if the sdist or the inner archive lacks the file, or its checksum differs.
    """
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            member = next((m for m in outer.getmembers() if m.name.endswith(INNER_ARCHIVE)), None)
            if member is None:
                raise DataError(f"{sdist} has no {INNER_ARCHIVE}")
            inner_bytes = outer.extractfile(member).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            member = next((m for m in inner.getmembers() if m.name.endswith(GROUND_TRUTH_FILE)), None)
            if member is None:
                raise DataError(f"{INNER_ARCHIVE} in {sdist} has no {GROUND_TRUTH_FILE}")
            data = inner.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot read {sdist}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != GROUND_TRUTH_SHA256:
        raise DataError(
            f"{GROUND_TRUTH_FILE} in {sdist} has SHA-256 {digest}, expected {GROUND_TRUTH_SHA256}"
        )
    return data.decode("utf-8")


def rebuild_rt_polarity(directory: Path | None = None) -> RtPolarityFiles:
    """Downloads the sdist and writes ``train/validation/test.jsonl`` into ``directory``.

    Args:
        directory: Target folder; :func:`cache_dir` when None. The sdist is kept in its ``download``
            subfolder so a second rebuild needs no network.

    Raises:
        DataError: if the download fails or the result does not have 8,566/1,000/1,000 rows.
    """
    directory = cache_dir() if directory is None else Path(directory)
    sdist = download_sdist(directory / "download")
    splits = split_rows(parse_ground_truth(read_ground_truth(sdist)))
    for name, rows in splits.items():
        if len(rows) != SPLIT_SIZES[name]:
            raise DataError(
                f"rebuilt rt-polarity {name} split has {len(rows)} rows, expected {SPLIT_SIZES[name]}"
            )
    files = _files_in(directory)
    for name in SPLIT_NAMES:
        write_jsonl(splits[name], getattr(files, name))
    return files


# ----------------------------------------------------------------------------------------------------
# Finding the files
# ----------------------------------------------------------------------------------------------------


def _files_in(directory: Path) -> RtPolarityFiles:
    return RtPolarityFiles(*(directory / f"{name}.jsonl" for name in SPLIT_NAMES))


def _complete(files: RtPolarityFiles) -> bool:
    return all(path.is_file() for path in files)


def _repo_root() -> Path | None:
    """The source checkout this module lives in (the first parent with a ``pyproject.toml``), if any."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def shared_data_candidates() -> list[Path]:
    """Folders that may hold ``rt-polarity/``, in the order they are tried.

    ``$APTUNE_SHARED_DATA``, then ``shared/data`` next to the repository (``<repo>/../shared/data``,
    then ``<repo>/shared/data``), then the same relative to the current working directory
    (``<cwd>/../shared/data``, ``<cwd>/shared/data``).
    """
    candidates: list[Path] = []
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        candidates.append(Path(env).expanduser())
    bases = [root for root in (_repo_root(), Path.cwd()) if root is not None]
    for base in bases:
        candidates += [base.parent / "shared" / "data", base / "shared" / "data"]
    unique: list[Path] = []
    for path in candidates:
        if path not in unique:
            unique.append(path)
    return unique


def find_shared_rt_polarity() -> RtPolarityFiles | None:
    """The shared rt-polarity files if some candidate folder holds all three, else None.

    A candidate may be the ``shared/data`` folder itself or its ``rt-polarity`` subfolder.
    """
    for folder in shared_data_candidates():
        for directory in (folder / "rt-polarity", folder):
            files = _files_in(directory)
            if _complete(files):
                return files
    return None


def rt_polarity_files(*, rebuild: bool = True) -> RtPolarityFiles:
    """Paths of rt-polarity's train/validation/test JSON-lines files.

    Looks in the shared data folder (see :func:`shared_data_candidates`), then in the cache
    (:func:`cache_dir`), and otherwise rebuilds the data into the cache from PyPI.

    Args:
        rebuild: If False, raise instead of downloading when neither copy exists.

    Raises:
        DataError: if the files are nowhere and cannot (or may not) be rebuilt.
    """
    shared = find_shared_rt_polarity()
    if shared is not None:
        return shared
    cached = _files_in(cache_dir())
    if _complete(cached):
        return cached
    if not rebuild:
        raise DataError(
            f"rt-polarity not found in shared data or in {cache_dir()}; set {SHARED_DATA_ENV} or allow a rebuild"
        )
    return rebuild_rt_polarity()
