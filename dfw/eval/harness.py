"""`lm_eval`: any lm-evaluation-harness task list on a model dfw loads, through lm-eval's Python API.

    python -m dfw.eval model=<export> tasks=[lm_eval] lm_eval.tasks=[lambada_openai,hellaswag]

runs `lm_eval.simple_evaluate` with lm-eval's `HFLM` wrapping the loaded model (`DFWLM`,
dfw/eval/lm_eval_model.py: a converted model generates with its RecurrentCache). Every metric of every
task becomes a row (the task's first metric is its headline). lm-eval is an optional dependency
(`pip install 'dfw[lm_eval]'`); its tasks download their datasets from the Hugging Face hub, or read
local files (`lm_eval.include_path=<folder of task YAMLs>`, e.g. `dataset_path: json` with
`dataset_kwargs.data_files`).

lm-eval's own command line with dfw's models is `python -m dfw.eval.lm_eval_cli` (`--model dfw`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .base import EvalModel, EvalTask, Measurement, positive_int

INSTALL = "pip install 'dfw[lm_eval]' (or pip install lm-eval)"


def task_manager(include_path: str | None, include_defaults: bool) -> Any:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(
            f"tasks=[lm_eval] needs lm-evaluation-harness, which is not installed: {INSTALL}"
        ) from None
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


@dataclass
class LMEvalHarness(EvalTask):
    name = "lm_eval"

    tasks: list[str] = field(default_factory=list)  # lm-eval task, group or tag names (lm-eval ls tasks)
    include_path: str | None = None  # a folder of task YAMLs of your own (added to lm-eval's)
    include_defaults: bool = True  # false: only include_path's tasks (skips indexing lm-eval's ~15k, ~7 s)
    num_fewshot: int | None = None  # null: each task's own
    limit: int | None = None  # at most this many examples per task (for quick checks)
    batch_size: int | None = None  # null: dfw.eval's batch_size
    bootstrap_iters: int = 100_000  # lm-eval's standard errors; 0: none (faster)

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        self.tasks = list(self.tasks or [])
        if not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(
                "lm_eval.tasks is empty: name the lm-eval tasks to run, e.g. lm_eval.tasks=[lambada_openai]"
            )
        for option in ("num_fewshot", "limit", "batch_size"):
            value = getattr(self, option)
            if value is not None and not (option == "num_fewshot" and value == 0):
                positive_int("lm_eval", option, value)
        if self.include_path is not None and not Path(self.include_path).expanduser().is_dir():
            raise ConfigError(f"lm_eval.include_path={self.include_path!r} is not a directory of task YAMLs")
        self._manager = task_manager(
            str(Path(self.include_path).expanduser()) if self.include_path else None, self.include_defaults
        )
        known = set(self._manager.match_tasks(self.tasks))
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ConfigError(
                f"lm_eval.tasks: lm-eval does not know {', '.join(unknown)}; "
                "list its tasks with `lm-eval ls tasks`"
                + (f" --include_path {self.include_path}" if self.include_path else "")
            )

    def run(self, model: EvalModel, data: Any) -> list[Measurement]:
        import lm_eval

        from .lm_eval_model import DFWLM

        lm = DFWLM(model.net, tokenizer=model.tokenizer, batch_size=self.batch_size or model.batch_size)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=self.tasks,
            num_fewshot=self.num_fewshot,
            limit=self.limit,
            task_manager=self._manager,
            bootstrap_iters=self.bootstrap_iters,
            log_samples=False,
            random_seed=self.seed,
            numpy_random_seed=self.seed,
            torch_random_seed=self.seed,
            fewshot_random_seed=self.seed,
        )
        results = []
        for task, metrics in sorted((output or {}).get("results", {}).items()):
            first = True
            for key, value in metrics.items():
                metric, _, filtering = key.partition(",")
                if (
                    not filtering
                    or metric.endswith("_stderr")
                    or not isinstance(value, int | float)
                    or isinstance(value, bool)
                ):
                    continue
                name = metric if filtering == "none" else f"{metric} ({filtering})"
                results.append(
                    Measurement(
                        "lm_eval", name, float(value), variant=task, headline=first and math.isfinite(value)
                    )
                )
                first = False
        return results
