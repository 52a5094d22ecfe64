"""Real text for the tasks that need it (`ppl`, `copy`'s text spans): a `conf/data` corpus tokenised with the
evaluated model's own tokenizer, through dfw's token cache (a corpus tokenised for training is not
tokenised again)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ..data import LanguageModelingDataModule, TokenBlocks
from ..errors import ConfigError, instantiate


class EvalData:
    """The splits of one corpus as token blocks or as one token stream, tokenised on first use.

    `datamodule`: a data module already built (dfw.train's, after training), or None to build one from
    `node` (a `conf/data` node) with `tokenizer`, the evaluated model's own.
    """

    def __init__(
        self,
        node: Any,
        tokenizer: PreTrainedTokenizerBase,
        datamodule: LanguageModelingDataModule | None = None,
    ) -> None:
        self.node, self.tokenizer, self._datamodule = node, tokenizer, datamodule

    @cached_property
    def datamodule(self) -> LanguageModelingDataModule:
        if self._datamodule is not None:
            return self._datamodule
        datamodule = instantiate(self.node, _convert_="all")
        if not isinstance(datamodule, LanguageModelingDataModule):
            raise ConfigError(
                f"data._target_ must be a LanguageModelingDataModule, got {type(datamodule).__name__}"
            )
        datamodule.tokenizer = self.tokenizer  # the model's own tokenizer, whatever data.tokenizer says
        return datamodule

    @property
    def corpus(self) -> str:
        return self.datamodule.corpus.name

    def _token_file(self, split: str) -> tuple[Path, np.dtype, int]:
        """(path, dtype, token count) of the split's token file, built or checked by the data module (the same
        cache, with its header, as training uses)."""
        path, header = self.datamodule._ensure_token_file(split)
        return path, np.dtype(header["dtype"]), int(header["tokens"])

    def blocks(self, split: str, block_size: int) -> TokenBlocks:
        """Consecutive, non-overlapping blocks of `block_size` tokens of `split`."""
        path, dtype, count = self._token_file(split)
        blocks = TokenBlocks(path, dtype, block_size, num_tokens=count)
        if len(blocks) == 0:
            raise ConfigError(
                f"the {split} split of data={self.corpus} has {blocks.num_tokens} tokens, fewer than one "
                f"block of {block_size}; use a larger split or a shorter block"
            )
        return blocks

    def tokens(self, split: str) -> Tensor:
        """The whole split as one token stream [N] (documents separated by EOS)."""
        path, dtype, count = self._token_file(split)
        return torch.from_numpy(np.fromfile(path, dtype=dtype, count=count).astype(np.int64))
