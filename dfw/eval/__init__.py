"""Evaluation beyond perplexity: `python -m dfw.eval model=<export | .ckpt | HF dir | hub id> tasks=[...]`.

The tasks (`TASKS`, one module each): `ppl` (perplexity overall and by position), `copy` (a span repeated
once: accuracy on the second copy), `recall` (MQAR key-value recall, pairs swept), `passkey` (a number in
filler text, greedy generation), `lm_eval` (any lm-evaluation-harness task). `dfw/eval/run.py` wires them
(`evaluate`, and `evaluation_after_training` for dfw.train's `eval.tasks=[...]`); docs/evaluation.md has the
measurements and how to read them.

How to add a task, e.g. `count` (is the model's top token the count of earlier "a" tokens?):

1. `dfw/eval/count.py`: a dataclass subclass of `EvalTask` whose fields are its options, with defaults;
   defining it registers it under `name`:

       from dataclasses import dataclass
       from .base import EvalTask, Measurement, generator, positive_int

       @dataclass
       class Count(EvalTask):
           name = "count"            # tasks=[count]; its options are count.<field>
           samples: int = 64         # a comment that says what the option is

           def __post_init__(self):  # check the options alone: ConfigError naming count.<option>
               positive_int("count", "samples", self.samples)

           def check(self, model, data):  # check them against the model (model.context, ...): ConfigError
               ...

           def run(self, model, data) -> list[Measurement]:
               # [N, T] token ids, generated from generator(self.seed, "count", ...): deterministic
               tokens = ...
               for rows, logits in model.logits_batches(tokens, "count"):  # batched, timed, progress bar
                   ...  # (or model.generate(prompts, max_new_tokens, "count") for greedy generation)
               return [Measurement("count", "acc", accuracy, axis="length", x=T, headline=True)]

   `run` returns every number it measured as a `Measurement` (metric, value, and the setting: a
   `variant` and a swept `axis` with its value `x`); one of them is the `headline`, the task's column in
   dfw.report. dfw.eval adds the task's tokens/s, writes results.csv, logs to W&B and prints the table.
2. Import the module below (`from . import count`) and add its options, with a comment each, to
   `conf/eval/tasks.yaml` (they are then `count.samples=...` for dfw.eval and `eval.count.samples=...`
   for dfw.train).
3. A test in `tests/eval/`: the task on a tiny `save_pretrained` model, against numbers computed another
   way (a hand-built sequence, a model whose answer is known).
"""

from . import copy, harness, passkey, ppl, recall  # noqa: F401  (each module registers its task)
from .base import TASKS, EvalModel, EvalTask, Measurement, ModelInfo
from .run import Evaluation, build_tasks, evaluate, evaluation_after_training

__all__ = [
    "TASKS",
    "EvalModel",
    "EvalTask",
    "Evaluation",
    "Measurement",
    "ModelInfo",
    "build_tasks",
    "evaluate",
    "evaluation_after_training",
]
