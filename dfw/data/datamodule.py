"""Language-modelling data: tokenise a corpus once into a token file per split, then serve fixed-length
blocks.

Token files live at cache_dir/tokens/<corpus>-<key>/<split>.bin: the split's documents tokenised, each
followed by the EOS token, concatenated, as raw uint16 (vocabularies up to 65536 tokens) or int32. The key
hashes the tokenizer's identity and the corpus's fingerprint, so a second run reads the files and
tokenises nothing, and a change of tokenizer or of text gets new files. The block size is not in the key:
blocks are cut when the files are read.

Beside each token file, `<split>.json` (its header) records the token count, dtype, tokenizer and corpus
fingerprints, the sha256 of the whole file and the sha256 of a sample of it; both files are written to a
temporary name and renamed, the header last. A run checks the header before it reads the tokens: the
fingerprints, the size (count x dtype) and, by default (`data.verify_cache=sampled`), the sample: 64 chunks
of 64 KiB spread evenly over the file, first and last included (at most 4 MiB read, whatever the size of the
corpus), which catches truncation, a foreign file and damage to any part the sample covers.
`data.verify_cache=full` hashes every byte instead (one pass over the file at each start). A file that fails
the check is rebuilt, with one log line naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerFast

from dfw.data.corpora import SPLITS, Corpus, load_corpus, short_hash
from dfw.data.sampler import ResumableSampler
from dfw.data.synthetic import SyntheticMix, SyntheticOptions, ordinary_ids
from dfw.data.tokenizers import load_tokenizer, parse_tokenizer_spec, tokenizer_fingerprint
from dfw.errors import ConfigError

log = logging.getLogger(__name__)

TOKEN_FILE_FORMAT = 2  # bump when the layout of token files changes; old caches are then ignored
VERIFY_CACHE = ("sampled", "full")
SAMPLE_CHUNKS, SAMPLE_BYTES = 64, 1 << 16  # the sampled check: 64 chunks of 64 KiB


class LanguageModelingDataModule(L.LightningDataModule):
    """Blocks of `block_size` tokens, as {"input_ids": LongTensor[block_size]}; batches are (B, T).

    The model takes labels = input_ids and shifts them itself, so a block of T tokens gives T - 1
    predictions. Training batches follow `ResumableSampler`: a pure function of (seed, global step).
    Validation and test batches are the split's blocks in order.
    """

    def __init__(
        self,
        corpus: str,  # wikitext103 | wikitext2 | shakespeare | text
        tokenizer: str,  # gpt2 | bpe-<N> | a directory (see dfw.data.tokenizers)
        block_size: int,  # tokens per example
        batch_size: int,  # training examples per device and micro-batch
        eval_batch_size: int | None = None,  # validation/test examples per batch; None: batch_size
        num_workers: int = 0,  # DataLoader worker processes
        cache_dir: str = "~/.cache/dfw",  # holds tokens/, tokenizers/ and corpora/
        seed: int = 0,  # the training order's seed
        files: Mapping[str, str | Sequence[str]] | None = None,  # data=text: {split: path, glob or list}
        verify_cache: str = "sampled",  # how token files are checked at start: sampled | full (module doc)
        synthetic: Mapping[str, float | int]
        | None = None,  # copy/recall segments in training blocks (dfw.data.synthetic)
    ) -> None:
        # Every option is checked here, so a bad one fails when the module is built (build it with
        # dfw.errors.instantiate to get the ConfigError rather than Hydra's wrapper). Nothing is read or
        # downloaded yet: that is prepare_data's.
        super().__init__()
        self.save_hyperparameters(logger=False)  # stored in checkpoints: which data a model was trained on
        eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        for option, value in (
            ("block_size", block_size),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"data.{option} must be a positive integer, got {value!r}")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ConfigError(f"data.num_workers must be a non-negative integer, got {num_workers!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"data.seed must be an integer, got {seed!r}")
        if verify_cache not in VERIFY_CACHE:
            raise ConfigError(
                f"data.verify_cache must be one of {', '.join(VERIFY_CACHE)}, got {verify_cache!r}"
            )
        self.verify_cache = verify_cache
        self._headers: dict[
            str, dict
        ] = {}  # split -> the header of its token file, once checked in this process
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.synthetic = SyntheticOptions.from_config(synthetic)
        self.cache_dir = Path(cache_dir).expanduser()
        self.corpus: Corpus = load_corpus(corpus, files, self.cache_dir)  # checks the corpus and data.files
        parse_tokenizer_spec(tokenizer)
        self.tokenizer_spec = tokenizer
        self.datasets: dict[str, TokenBlocks] = {}

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """Loaded (bpe-<N>: trained) on first use; ready before fit to size a model and to save with it."""
        return load_tokenizer(self.tokenizer_spec, self.corpus, self.cache_dir)

    def token_file(self, split: str) -> Path:
        return self._token_dir / f"{split}.bin"

    @cached_property
    def _token_dir(self) -> Path:
        key = short_hash(
            json.dumps([TOKEN_FILE_FORMAT, tokenizer_fingerprint(self.tokenizer), self.corpus.fingerprint])
        )
        return self.cache_dir / "tokens" / f"{self.corpus.name}-{key}"

    def identity(self) -> dict[str, object]:
        """What a resume must find unchanged for its data order to be the one it was trained on: the token
        contents (sha256 per split), the tokenizer, the corpus, the block and batch sizes, the seed."""
        return {
            "corpus": self.corpus.name,
            "corpus_fingerprint": self.corpus.fingerprint,
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "tokens_sha256": {split: self._ensure_token_file(split)[1]["sha256"] for split in SPLITS},
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, object]:
        """Stored in every checkpoint (Lightning's datamodule state); `dfw.train` compares it on resume."""
        return {"identity": self.identity()}

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        pass  # checked before training by dfw.train (a mismatch is refused there, or allowed and logged)

    def prepare_data(self) -> None:
        """Download and tokenise whatever is not cached yet (Lightning runs this on one process per node)."""
        for split in SPLITS:
            self._ensure_token_file(split)

    def setup(self, stage: str | None = None) -> None:
        """Open all three token files whatever the stage: it is cheap, and a split too short for a block
        is reported before training rather than at the test after it."""
        for split in SPLITS:
            self._open(split)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer  # None outside a Trainer: then training starts at step 0 and makes one pass
        accumulate = trainer.accumulate_grad_batches if trainer else 1
        world_size = trainer.world_size if trainer else 1
        max_steps = trainer.max_steps if trainer and trainer.max_steps > 0 else None
        sampler = ResumableSampler(
            num_items=len(self._open("train")),
            seed=self.seed,
            samples_per_step=self.batch_size * accumulate * world_size,
            current_step=lambda: trainer.global_step if trainer else 0,
            max_steps=max_steps,
            rank=trainer.global_rank if trainer else 0,
            world_size=world_size,
            positions=self.synthetic is not None,  # SyntheticMix maps stream positions to blocks itself
        )
        return self._loader("train", self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False, drop_last=False)

    def _loader(self, split: str, batch_size: int, **kwargs) -> DataLoader:
        dataset = self._open(split)
        if split == "train" and self.synthetic is not None:
            ids = ordinary_ids(len(self.tokenizer), self.tokenizer.all_special_ids)
            dataset = SyntheticMix(dataset, self.synthetic, ids, self.seed, kwargs["sampler"])
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            # Its own generator: starting an iterator then draws no number from the global RNG, so a
            # resumed run's dropout masks are the ones the uninterrupted run drew.
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def _open(self, split: str) -> TokenBlocks:
        if split not in self.datasets:
            path, header = self._ensure_token_file(split)  # checked once per process
            dataset = TokenBlocks(
                path, np.dtype(header["dtype"]), self.block_size, num_tokens=header["tokens"]
            )
            if len(dataset) == 0:
                raise ConfigError(
                    f"data.block_size={self.block_size} is longer than the {split} split "
                    f"({dataset.num_tokens} tokens); lower data.block_size"
                )
            self.datasets[split] = dataset
        return self.datasets[split]

    def _ensure_token_file(self, split: str) -> tuple[Path, dict]:
        """The split's token file and its header, checked (once per process), built or rebuilt if needed."""
        path = self.token_file(split)
        if split in self._headers:
            return path, self._headers[split]
        expected = {
            "format": TOKEN_FILE_FORMAT,
            "dtype": token_dtype(len(self.tokenizer)).name,
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "corpus": self.corpus.fingerprint,
        }
        problem = "missing" if not path.is_file() else check_token_file(path, expected, self.verify_cache)
        if problem is not None:
            if problem != "missing":
                log.warning("token cache %s is damaged (%s): rebuilding it", path, problem)
            try:
                tokenize_to_file(self.corpus.documents(split), self.tokenizer, path, expected)
            except OSError as err:
                if problem == "missing":
                    raise ConfigError(
                        f"could not write the token cache {path} ({err}); set paths.cache_dir to a writable "
                        "folder"
                    ) from None
                raise ConfigError(
                    f"token cache {path} is damaged ({problem}) and cannot be rebuilt ({err}); delete it, or "
                    "set paths.cache_dir to a writable folder"
                ) from None
        self._headers[split] = json.loads(header_file(path).read_text())
        return path, self._headers[split]


class TokenBlocks(Dataset):
    """Consecutive, non-overlapping blocks of `block_size` tokens of one token file; the tail shorter than
    a block is left out. The file is memory-mapped on first access, in each DataLoader worker separately."""

    def __init__(self, path: Path, dtype: np.dtype, block_size: int, num_tokens: int | None = None) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.block_size = block_size
        self.num_tokens = path.stat().st_size // self.dtype.itemsize if num_tokens is None else num_tokens
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        return self.num_tokens // self.block_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} of {len(self)}")
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        block = self._tokens[index * self.block_size : (index + 1) * self.block_size]  # (T,)
        return {"input_ids": torch.from_numpy(block.astype(np.int64))}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}  # workers map the file themselves instead of copying it


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def header_file(path: Path) -> Path:
    """The header (sidecar) of a token file: `<split>.json` beside `<split>.bin`."""
    return path.with_suffix(".json")


def sampled_sha256(path: Path, size: int) -> str:
    """sha256 of SAMPLE_CHUNKS chunks of SAMPLE_BYTES spread evenly over the file (all of it when it is
    small)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= SAMPLE_CHUNKS * SAMPLE_BYTES:
            digest.update(f.read())
        else:
            last = size - SAMPLE_BYTES
            for i in range(SAMPLE_CHUNKS):
                f.seek(last * i // (SAMPLE_CHUNKS - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def full_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def check_token_file(path: Path, expected: Mapping[str, object], verify: str = "sampled") -> str | None:
    """None when `path` and its header agree with each other and with `expected`; else what is wrong."""
    try:
        header = json.loads(header_file(path).read_text())
    except FileNotFoundError:
        return f"no header {header_file(path).name}"
    except (OSError, ValueError) as err:
        return f"unreadable header {header_file(path).name}: {err}"
    if not isinstance(header, dict):
        return f"header {header_file(path).name} is not a mapping"
    for key, value in expected.items():
        if header.get(key) != value:
            return f"its header's {key} is {str(header.get(key))[:40]!r}, expected {str(value)[:40]!r}"
    size = path.stat().st_size
    try:
        expected_size = int(header["tokens"]) * np.dtype(header["dtype"]).itemsize
    except (KeyError, TypeError, ValueError):
        return "its header has no token count"
    if size != expected_size:
        return (
            f"{size} bytes, its header says {header['tokens']} tokens of {header['dtype']} "
            f"({expected_size} bytes)"
        )
    if verify == "full":
        if full_sha256(path) != header.get("sha256"):
            return "the sha256 of its contents differs from its header's"
    elif sampled_sha256(path, size) != header.get("sample_sha256"):
        return "the sha256 of a sample of its contents differs from its header's"
    return None


def tokenize_to_file(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerFast,
    path: Path,
    header: Mapping[str, object] | None = None,
) -> int:
    """Write the documents' token ids, each document followed by EOS, to `path`, and its header (`header`
    plus the count and checksums) beside it; returns the token count. Both go to temporary files that are
    renamed, the header last, so an interrupted run never leaves a truncated cache that looks whole."""
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    staging_header = header_file(path).with_name(f"{header_file(path).name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    count = 0
    try:
        with open(staging, "wb") as out:
            for batch in _batches(_pieces(documents)):
                # The Rust tokenizer directly: parallel over the batch, and no special tokens (BOS) added.
                encodings = tokenizer.backend_tokenizer.encode_batch(
                    [text for text, _ in batch], add_special_tokens=False
                )
                ids: list[int] = []
                for encoding, (_, ends_document) in zip(encodings, batch, strict=True):
                    ids.extend(encoding.ids)
                    if ends_document:
                        ids.append(eos)
                chunk = np.asarray(ids, dtype=dtype).tobytes()
                out.write(chunk)
                digest.update(chunk)
                count += len(ids)
        size = staging.stat().st_size
        record = {
            **(header or {}),
            "format": TOKEN_FILE_FORMAT,
            "tokens": count,
            "dtype": dtype.name,
            "sha256": digest.hexdigest(),
            "sample_sha256": sampled_sha256(staging, size),
        }
        staging_header.write_text(json.dumps(record, indent=1))
        header_file(path).unlink(missing_ok=True)  # a token file never sits beside another file's header
        os.replace(staging, path)
        os.replace(staging_header, header_file(path))
    finally:
        staging.unlink(missing_ok=True)
        staging_header.unlink(missing_ok=True)
    return count


def _pieces(documents: Iterable[str], max_chars: int = 1 << 20) -> Iterator[tuple[str, bool]]:
    """(text, ends_document): documents cut after a newline into pieces of at most ~max_chars, which bounds
    the tokenizer's memory on a large file. A cut can change a token at the cut ("\\n\\n" -> "\\n" "\\n")."""
    for document in documents:
        while len(document) > max_chars:
            cut = document.rfind("\n", 0, max_chars) + 1 or max_chars
            yield document[:cut], False
            document = document[cut:]
        yield document, True


def _batches(
    pieces: Iterable[tuple[str, bool]], max_chars: int = 1 << 22
) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
