"""Wiring of `python -m dfw.eval` and of the evaluation after training: tasks, model, data, results.

Everything the user named is checked before anything is written: the task names and options, the
model (loaded), each task's settings against the model (L against the context, ...), the corpus. Then
each task runs in turn and its numbers are added to `<out_dir>/results.csv` at once (rewritten whole
and renamed over the old file), so a run interrupted halfway keeps the tasks already finished.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, instantiate
from .base import TASKS, EvalModel, EvalTask, Measurement, ModelInfo
from .data import EvalData

log = logging.getLogger("dfw.eval")

RESULTS = "results.csv"
INFO_COLUMNS = [f.name for f in fields(ModelInfo)]
COLUMNS = [
    "model",
    *[c for c in INFO_COLUMNS if c != "source"],
    "task",
    "metric",
    "variant",
    "axis",
    "x",
    "x_to",
    "value",
    "headline",
    "seed",
]


def build_tasks(names: Any, options: Mapping[str, Any], seed: int) -> list[EvalTask]:
    """The tasks `names` lists, each built from `options[<name>]` (its options are checked here)."""
    if isinstance(names, str):
        names = [names]
    names = list(names or [])
    known = ", ".join(sorted(TASKS))
    if not names:
        raise ConfigError(
            f"tasks is empty: name the tasks to run, e.g. tasks=[ppl,copy,recall] (tasks: {known})"
        )
    tasks = []
    for name in names:
        if name not in TASKS:
            raise ConfigError(f"tasks: {name!r} is not a dfw.eval task; the tasks are {known}")
        if names.count(name) > 1:
            raise ConfigError(f"tasks: {name} is listed twice; list each task once")
        node = options.get(name) or {}
        node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        accepted = sorted(f.name for f in fields(TASKS[name]) if f.name != "seed")
        unknown = sorted(set(node) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{name}.{unknown[0]} is not an option of the {name} task; its options are "
                f"{', '.join(accepted)}"
            )
        tasks.append(TASKS[name](**{**node, "seed": seed}))
    return tasks


def check_batch_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {value!r}")
    return value


class Results:
    """The measurements of one evaluation: results.csv (rewritten after each task) and the loggers."""

    def __init__(
        self, out_dir: Path, info: ModelInfo, seed: int, loggers: Iterable[Any] = (), step: int | None = None
    ):
        self.out_dir, self.info, self.seed, self.loggers, self.step = out_dir, info, seed, list(loggers), step
        self.rows: list[Measurement] = []
        self.tasks_done: list[str] = []

    def add(self, task: str, measurements: list[Measurement]) -> None:
        self.rows += measurements
        self.tasks_done.append(task)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        staging = self.out_dir / f".{RESULTS}.{os.getpid()}.tmp"
        with open(staging, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.records(self.rows))
        os.replace(staging, self.out_dir / RESULTS)
        metrics = {m.key: m.value for m in measurements if math.isfinite(m.value)}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.step)

    def records(self, rows: Iterable[Measurement]) -> list[dict[str, Any]]:
        info = asdict(self.info)
        model = {"model": info.pop("source"), **info}
        return [{**model, **asdict(m), "seed": self.seed} for m in rows]


def run_tasks(tasks: list[EvalTask], model: EvalModel, data: EvalData, results: Results) -> None:
    for task in tasks:
        torch.manual_seed(task.seed)
        model.reset_clock()
        began = time.perf_counter()
        measurements = task.run(model, data)
        seconds = time.perf_counter() - began
        if model.tokens:
            measurements.append(Measurement(task.name, "tokens_per_sec", model.tokens_per_second))
        log.info(
            "%s: %d numbers in %.1f s%s",
            task.name,
            len(measurements),
            seconds,
            f", {model.tokens_per_second:,.0f} tokens/s" if model.tokens else "",
        )
        results.add(task.name, measurements)


def _value(metric: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if metric in ("acc", "exact_match") or metric.startswith("acc"):
        return f"{100 * value:.1f}%"
    if metric == "tokens_per_sec":
        return f"{value:,.0f}"
    if metric == "ppl" or "perplexity" in metric:
        return f"{value:,.2f}"
    return f"{value:.4g}"


def describe_model(info: ModelInfo) -> str:
    m = f"m={info.state_size}" if info.state_size is not None else "KV cache"
    return (
        f"{info.source} ({info.kind}; attention={info.attention}, {m}, generation state "
        f"{info.state_bytes / 1024:,.1f} KiB per sequence at {info.context} tokens; {info.parameters:,} "
        "parameters)"
    )


def table(rows: list[Measurement], info: ModelInfo) -> str:
    """The one table dfw.eval prints: a row per task and setting with every number measured there."""
    cells: dict[tuple[str, str], list[str]] = {}
    for m in rows:
        name = "tokens/s" if m.metric == "tokens_per_sec" else m.metric
        cells.setdefault((m.task, m.setting), []).append(f"{name} {_value(m.metric, m.value)}")
    lines = [f"model: {describe_model(info)}", "", "| task | setting | measured |", "|---|---|---|"]
    lines += [f"| {task} | {setting} | {', '.join(values)} |" for (task, setting), values in cells.items()]
    return "\n".join(lines) + "\n"


def _wandb_logger(node: Any, info: ModelInfo, config: dict[str, Any]) -> Any:
    if node is None:
        return None
    name = node.get("name") or f"eval-{info.attention}-{Path(info.source.rstrip('/')).name}"
    logger = instantiate(node, name=name)
    logger.log_hyperparams({"eval": config, "model_info": asdict(info)})
    return logger


def evaluate(cfg: DictConfig) -> list[Measurement]:
    """`python -m dfw.eval`: check everything, then run the tasks, write and print their numbers."""
    from .load import load_eval_model

    tasks = build_tasks(cfg.tasks, cfg, cfg.seed)
    batch_size = check_batch_size(cfg.batch_size)
    model = load_eval_model(str(cfg.model), str(cfg.device), str(cfg.dtype), batch_size, bool(cfg.progress))
    data = EvalData(cfg.data, model.tokenizer)
    for task in tasks:
        task.check(model, data)  # the corpus is read (and tokenised once) here, before anything is written
    out_dir = Path(str(cfg.out_dir)).expanduser()
    config = OmegaConf.to_container(cfg, resolve=True)
    logger = _wandb_logger(cfg.get("wandb"), model.info, config)
    results = Results(out_dir, model.info, cfg.seed, loggers=[logger] if logger is not None else [])
    log.info("evaluating %s", describe_model(model.info))
    try:
        run_tasks(tasks, model, data, results)
    except KeyboardInterrupt:
        kept = ", ".join(results.tasks_done) or "none"
        log.error("interrupted: %s keeps the tasks already finished (%s)", out_dir / RESULTS, kept)
        raise
    finally:
        if logger is not None and logger._experiment is not None:
            logger.experiment.finish()
    text = table(results.rows, model.info)
    (out_dir / "results.md").write_text(text)
    print(text)
    print(f"written to {out_dir / RESULTS} and {out_dir / 'results.md'}")
    return results.rows


class Evaluation:
    """dfw.train's evaluation after training (`eval.tasks=[...]`), planned and checked before training."""

    def __init__(
        self, tasks: list[EvalTask], model: EvalModel, data: EvalData, out_dir: Path, seed: int
    ) -> None:
        self.tasks, self.model, self.data, self.out_dir, self.seed = tasks, model, data, out_dir, seed

    def run(
        self, net: torch.nn.Module, loggers: Iterable[Any] = (), step: int | None = None
    ) -> dict[str, float]:
        """Evaluate `net` (the trained model), write results.csv, log every number to `loggers` at `step`;
        returns the headline numbers (`eval/<task>/...`)."""
        training = net.training
        self.model.net = net.eval()
        results = Results(self.out_dir, self.model.info, self.seed, loggers=loggers, step=step)
        try:
            run_tasks(self.tasks, self.model, self.data, results)
        finally:
            net.train(training)
        for logger in loggers:
            if hasattr(logger, "save"):
                logger.save()  # the CSV logger writes what it was given at its next save
        text = table(results.rows, self.model.info)
        (self.out_dir / "results.md").write_text(text)
        log.info("evaluation after training, written to %s:\n%s", self.out_dir / RESULTS, text)
        return {m.key: m.value for m in results.rows if m.headline}


def evaluation_after_training(cfg: DictConfig, net: torch.nn.Module, datamodule: Any) -> Evaluation | None:
    """The evaluation `cfg.eval` asks for (None when `eval.tasks` is empty), checked against `net` (its
    context and vocabulary) and the run's corpus now, so that a bad option fails before training."""
    from .load import describe

    node = cfg.get("eval")
    if not node or not node.get("tasks"):
        return None
    tasks = build_tasks(node.tasks, node, cfg.seed)
    tokenizer = datamodule.tokenizer
    source = str(cfg.get("export_dir") or cfg.paths.output_dir)
    info = describe(net, source, "trained run", OmegaConf.to_container(cfg.attention, resolve=True))
    model = EvalModel(net, tokenizer, info, check_batch_size(node.get("batch_size", 16)), progress=False)
    data = EvalData(cfg.data, tokenizer, datamodule=datamodule)
    for task in tasks:
        task.check(model, data)
    return Evaluation(
        tasks, model, data, Path(str(node.get("out_dir") or Path(cfg.paths.output_dir) / "eval")), cfg.seed
    )
