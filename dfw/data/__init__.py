"""The data side: corpora, tokenizers, the token cache, and the LightningDataModule that the data configs
build."""

from dfw.data.corpora import SPLITS, Corpus, load_corpus
from dfw.data.datamodule import LanguageModelingDataModule, TokenBlocks, tokenize_to_file
from dfw.data.sampler import ResumableSampler
from dfw.data.tokenizers import EOS, gpt2_tokenizer, load_tokenizer

__all__ = [
    "EOS",
    "SPLITS",
    "Corpus",
    "LanguageModelingDataModule",
    "ResumableSampler",
    "TokenBlocks",
    "gpt2_tokenizer",
    "load_corpus",
    "load_tokenizer",
    "tokenize_to_file",
]
