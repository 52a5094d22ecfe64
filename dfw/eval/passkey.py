"""`passkey`: passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"; the test LongLoRA and the
conversion papers report): a 5-digit number hidden in repeated filler text at a swept depth, in prompts of
swept length, asked for at the end. Scored by exact match of the number greedy decoding produces.

The prompt, as in the paper:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will
    quiz you about the important information there. The grass is green. The sky is blue. The sun is
    yellow. Here we go. There and back again. (repeated) The pass key is 68410. Remember it. 68410 is the
    pass key. The grass is green. ... (repeated) What is the pass key? The pass key is

It tests a model large enough to follow an instruction; the small models of the CPU demo score zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .base import EvalModel, EvalTask, Measurement, generator, positive_int, positive_ints

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass
class Passkey(EvalTask):
    name = "passkey"

    lengths: list[int] | None = None  # prompt lengths in tokens; null: the longest that fits and half of it
    depths: list[float] | None = (
        None  # where the key sits in the filler, 0 (start) to 1 (end); null: 0, .25, .5, .75, 1
    )
    samples: int = 10  # prompts (keys) per length and depth

    def __post_init__(self) -> None:
        self.lengths = positive_ints("passkey", "lengths", self.lengths)
        positive_int("passkey", "samples", self.samples)
        depths = [0.0, 0.25, 0.5, 0.75, 1.0] if self.depths is None else self.depths
        if isinstance(depths, int | float):
            depths = [depths]
        if not depths or any(
            isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d <= 1 for d in depths
        ):
            raise ConfigError(
                f"passkey.depths must be a non-empty list of fractions from 0 to 1, got {self.depths!r}"
            )
        self.depths = sorted({float(d) for d in depths})

    def _pieces(self, model: EvalModel) -> tuple[int, int, int]:
        """Token counts: (the prompt without filler, one filler repetition, the tokens to generate)."""
        encode = lambda text: len(model.tokenizer(text, add_special_tokens=False).input_ids)
        fixed = encode(INTRO + NEEDLE.format(key="00000") + QUESTION)
        return fixed, encode(FILLER), encode(" 00000") + 1

    def _lengths(self, model: EvalModel) -> list[int]:
        fixed, filler, new = self._pieces(model)
        longest = model.context - new
        if self.lengths:
            return self.lengths
        return sorted({length for length in (longest // 2, longest) if length >= fixed + filler})

    def check(self, model: EvalModel, data: Any) -> None:
        fixed, filler, new = self._pieces(model)
        longest = model.context - new
        for length in self._lengths(model):
            if length > longest:
                raise ConfigError(
                    f"passkey.lengths: {length} tokens and {new} to generate exceed the model's context of "
                    f"{model.context}; use lengths up to {longest}"
                )
            if length < fixed + filler:
                raise ConfigError(
                    f"passkey.lengths: {length} tokens cannot hold the prompt ({fixed} tokens) and one "
                    f"filler sentence ({filler}); use at least {fixed + filler}"
                )
        if not self._lengths(model):
            raise ConfigError(
                f"passkey: the prompt ({fixed + filler} tokens) does not fit the model's context of "
                f"{model.context}"
            )

    def run(self, model: EvalModel, data: Any) -> list[Measurement]:
        fixed, filler, new = self._pieces(model)
        results, scores = [], []
        for length in self._lengths(model):
            repeats = (length - fixed) // filler
            for depth in self.depths:
                rng = generator(self.seed, "passkey", length, depth)
                keys = [
                    str(k) for k in torch.randint(10_000, 100_000, (self.samples,), generator=rng).tolist()
                ]
                before = round(depth * repeats)
                prompts = []
                for key in keys:
                    text = (
                        INTRO
                        + FILLER * before
                        + NEEDLE.format(key=key)
                        + FILLER * (repeats - before)
                        + QUESTION
                    )
                    prompts.append(model.tokenizer(text, add_special_tokens=False).input_ids[-length:])
                outputs = model.generate(prompts, new, f"passkey length={length} depth={depth:g}")
                answers = [model.tokenizer.decode(out, skip_special_tokens=True) for out in outputs]
                found = [re.match(r"\s*(\d+)", answer) for answer in answers]
                score = sum(
                    m is not None and m.group(1) == key for m, key in zip(found, keys, strict=True)
                ) / len(keys)
                scores.append(score)
                results.append(
                    Measurement(
                        "passkey", "exact_match", score, variant=f"length={length}", axis="depth", x=depth
                    )
                )
        results.append(
            Measurement(
                "passkey",
                "exact_match",
                sum(scores) / len(scores),
                variant="mean over lengths and depths",
                headline=True,
            )
        )
        return results
