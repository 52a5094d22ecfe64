"""What every evaluation task shares: the task base class and its registry, the measured numbers, and the
model being evaluated (batched scoring and greedy generation on its device, with a progress bar and a
token count for tokens/s).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..errors import ConfigError

# name -> task class; filled by defining an EvalTask subclass with a `name` (see dfw/eval/__init__.py)
TASKS: dict[str, type[EvalTask]] = {}


@dataclass
class Measurement:
    """One number a task measured, with the setting it was measured at."""

    task: str  # the task's registered name: ppl, copy, recall, passkey, lm_eval
    metric: str  # what the value is: ppl, loss (nats per token), acc, exact_match, tokens_per_sec, ...
    value: float
    variant: str = ""  # which kind of input: random | text (copy), the lm-eval task, length=<T> (passkey)
    axis: str = ""  # the swept setting `x` is a value of: position, L, pairs, depth ("" when none)
    x: float | None = None  # its value (a position bin's first position, L, the number of pairs, ...)
    x_to: float | None = None  # for a bin of values: its last one (position bins: 16 to 31)
    headline: bool = False  # the task's summary number (a column of dfw.report's table)

    @property
    def where(self) -> str:
        """`L=32`, `position=16-31`, `mean over L` (a summary over the axis), or "" without an axis."""
        if not self.axis:
            return ""
        if self.x is None:
            return f"mean over {self.axis}"
        to = f"-{_number(self.x_to)}" if self.x_to is not None else ""
        return f"{self.axis}={_number(self.x)}{to}"

    @property
    def setting(self) -> str:
        """The setting as the printed table shows it, e.g. `random, L=32`."""
        return ", ".join(part for part in (self.variant, self.where) if part)

    @property
    def key(self) -> str:
        """The name it is logged under: `eval/copy/acc/random/L=32`."""
        return "/".join(part for part in ("eval", self.task, self.metric, self.variant, self.where) if part)


def _number(x: float | None) -> str:
    return "" if x is None else (f"{int(x)}" if float(x).is_integer() else f"{x:g}")


@dataclass
class ModelInfo:
    """What is recorded beside every number: which model, converted to what."""

    source: str  # what `model=` named (a path or a hub id)
    kind: str  # export | checkpoint | hf_dir | hub | trained run
    attention: str  # the attention preset's name (softmax for a plain GPT-2)
    state_size: int | None  # m of a fast-weight core; None for softmax (its KV cache grows with the context)
    state_bytes: int  # generation state of one sequence after `context` tokens, float32
    context: int  # the model's learned positions (n_positions)
    parameters: int


class EvalModel:
    """The model under evaluation on its device: batched logits, greedy generation, tokens counted.

    `logits_batches` and `generate` count the tokens they process (prompt and generated), and
    `tokens_per_second` is that count over the time they took since `reset_clock`.
    """

    def __init__(
        self,
        net: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        info: ModelInfo,
        batch_size: int,
        progress: bool = True,
    ) -> None:
        self.net, self.tokenizer, self.info = net, tokenizer, info
        self.batch_size, self.progress = batch_size, progress
        self.converted = info.attention != "softmax"
        self.reset_clock()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def context(self) -> int:
        return self.info.context

    def ordinary_ids(self) -> Tensor:
        """Every token id of the vocabulary but the special ones (the ids synthetic tasks draw from)."""
        from ..data.synthetic import ordinary_ids

        vocab = min(len(self.tokenizer), self.net.config.vocab_size)
        return ordinary_ids(vocab, self.tokenizer.all_special_ids)

    def reset_clock(self) -> None:
        self.tokens, self.seconds = 0, 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    def logits_batches(self, tokens: Tensor, description: str) -> Iterator[tuple[slice, Tensor]]:
        """(rows, logits [b, T, V] float32) for `tokens` [N, T], no padding, in batches of as many tokens as
        `batch_size` sequences of the full context (shorter sequences: proportionally more rows)."""
        rows_per_batch = max(1, self.batch_size * self.context // tokens.shape[1])
        bar = tqdm(
            total=len(tokens), desc=description, unit="seq", leave=False, disable=not self.progress or None
        )
        with bar, torch.inference_mode():
            for start in range(0, len(tokens), rows_per_batch):
                rows = slice(start, min(start + rows_per_batch, len(tokens)))
                batch = tokens[rows].to(self.device)  # (b, T)
                began = time.perf_counter()
                logits = self.net(input_ids=batch, use_cache=False).logits.float()  # (b, T, V)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.seconds += time.perf_counter() - began
                self.tokens += batch.numel()
                yield rows, logits
                bar.update(rows.stop - rows.start)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, description: str) -> list[list[int]]:
        """Greedy continuations (new tokens only) of `prompts` (token id lists), batched with left padding.

        A converted model decodes with dfw's `RecurrentCache` (passed explicitly, which generate() accepts
        whether or not it supplies one itself), a softmax GPT-2 with transformers' KV cache.
        """
        from ..cache import RecurrentCache

        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        outputs: list[list[int]] = []
        bar = tqdm(
            total=len(prompts), desc=description, unit="seq", leave=False, disable=not self.progress or None
        )
        with bar, torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                width = max(len(p) for p in batch)
                ids = torch.tensor(
                    [[pad] * (width - len(p)) + p for p in batch], device=self.device
                )  # (b, T)
                mask = torch.tensor(
                    [[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device
                )
                cache = {"cache": RecurrentCache(self.net)} if self.converted else {}
                began = time.perf_counter()
                out = self.net.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    **cache,
                )
                self.seconds += time.perf_counter() - began
                self.tokens += int(mask.sum()) + len(batch) * (out.shape[1] - width)
                outputs += out[:, width:].tolist()
                bar.update(len(batch))
        return outputs


def stable_seed(*parts: Any) -> int:
    """A seed derived from `parts` (the run's seed, the task, its setting), the same in every process."""
    return zlib.crc32(repr(parts).encode())


def generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*parts))


@dataclass
class EvalTask:
    """An evaluation task: options checked when built, checked against the model, then run.

    Subclasses are dataclasses whose fields are the task's options (`<name>.<field>` in the config) and
    set `name`; defining one registers it in `TASKS`. `check` raises ConfigError for a setting the model
    cannot be measured at (before anything is written); `run` returns the measurements.
    """

    name: ClassVar[str] = ""
    seed: int = field(default=1234, repr=False)  # the run's seed (set by dfw.eval, not a task option)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            TASKS[cls.name] = cls

    def check(self, model: EvalModel, data: Any) -> None:
        """Raise ConfigError when an option does not fit `model` (its context, its vocabulary) or `data`
        (an EvalData: a split too short); reading the corpus here means it is read before anything is
        written."""

    def run(self, model: EvalModel, data: Any) -> list[Measurement]:
        raise NotImplementedError


def positive_ints(task: str, option: str, values: Any, allow_none: bool = True) -> list[int] | None:
    """A list of positive integers (sorted, distinct), or None when allowed; else one ConfigError."""
    if values is None and allow_none:
        return None
    try:
        items = [values] if isinstance(values, int) else list(values)
    except TypeError:
        items = None
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in items):
        raise ConfigError(f"{task}.{option} must be a non-empty list of positive integers, got {values!r}")
    return sorted(set(items))


def positive_int(task: str, option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{task}.{option} must be a positive integer, got {value!r}")
    return value
