"""Tokenizer specs: gpt2 offline, bpe-<N> trained and cached, a saved directory, and wrong specs."""

from __future__ import annotations

from pathlib import Path

import pytest

import dfw.data.tokenizers
from dfw.data import EOS, gpt2_tokenizer, load_corpus, load_tokenizer
from dfw.data.tokenizers import tokenizer_fingerprint
from dfw.errors import ConfigError


@pytest.fixture
def corpus(tmp_path: Path):
    for split, text in {
        "train": "the quick brown fox jumps over the lazy dog. " * 50,
        "validation": "a",
        "test": "b",
    }.items():
        (tmp_path / f"{split}.txt").write_text(text)
    return load_corpus(
        "text", {s: str(tmp_path / f"{s}.txt") for s in ("train", "validation", "test")}, tmp_path / "cache"
    )


def test_gpt2_is_built_offline_with_gpt2_ids():
    tokenizer = gpt2_tokenizer()
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.encode(" Hello world") == [18435, 995]
    assert len(tokenizer) == 50257 and tokenizer.eos_token == EOS and tokenizer.eos_token_id == 50256
    assert tokenizer.decode(tokenizer.encode("naïve café ☃\n\n")) == "naïve café ☃\n\n"


def test_bpe_is_trained_on_the_training_split_once_and_cached(tmp_path, corpus, monkeypatch):
    tokenizer = load_tokenizer("bpe-300", corpus, tmp_path / "cache")
    assert 257 < len(tokenizer) <= 300 and tokenizer.eos_token == EOS
    assert len(tokenizer.encode("the quick brown fox")) < len("the quick brown fox") / 2  # it learned merges
    text = "unseen bytes: é ☃ \x00"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level: nothing is out of vocabulary
    saved = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert (
        len(saved) == 1
        and saved[0].name.startswith("text-bpe-300-")
        and (saved[0] / "tokenizer.json").is_file()
    )

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the tokenizer is cached")

    monkeypatch.setattr(dfw.data.tokenizers, "BpeTrainer", no_training)
    again = load_tokenizer("bpe-300", corpus, tmp_path / "cache")
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tokenizer)


def test_a_saved_tokenizer_directory_is_a_spec(tmp_path, corpus):
    gpt2 = gpt2_tokenizer()
    gpt2.save_pretrained(tmp_path / "export")  # what the lead's export does next to a checkpoint
    loaded = load_tokenizer(str(tmp_path / "export"), corpus, tmp_path / "cache")
    assert loaded.encode("Hello world") == [15496, 995] and loaded.eos_token_id == 50256
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(gpt2)  # so it reuses gpt2's token cache


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gpt-2", r"model\.tokenizer='gpt-2' is not a tokenizer: use gpt2, bpe-<N>"),
        ("bpe-256", r"model\.tokenizer=bpe-256 is too small; a byte-level BPE needs N > 256"),
    ],
)
def test_wrong_specs_raise_config_errors(tmp_path, corpus, spec, message):
    with pytest.raises(ConfigError, match=message):
        load_tokenizer(spec, corpus, tmp_path / "cache")
