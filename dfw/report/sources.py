"""Reading runs back: a run directory's CSV logs, a Hydra multirun directory, a W&B project's API.

Every run writes `csv/metrics.csv` and `csv/hparams.yaml` (both logger configs include Lightning's
CSVLogger), so a local run is read from them alone; W&B's own files are W&B's business (`wandb sync`
uploads them, the API reads them back).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from dfw.errors import ConfigError
from dfw.run_folder import holder

from .evaluation import EVAL_RESULTS, read_evaluation

STEP = "step"
VAL_PPL, TEST_PPL, TOKENS_PER_SEC = "val/ppl", "test/ppl", "train/device/items_per_sec"
TRAIN_LOSS = "train/loss"
STATE_BYTES, STATE_SIZE, PARAMS_NEW = "model/state_bytes_per_sequence", "model/state_size", "model/params_new"


@dataclass
class Run:
    """One run of a sweep, as read back from its logs."""

    name: str  # job directory (`3_decay`) or W&B run name
    source: str  # where it was read from
    config: dict[str, Any]  # the resolved run config, flattened: {"attention.name": ...}
    history: pd.DataFrame  # one row per logged step: `step` and metric columns
    status: str = "finished"  # finished | running | crashed | export failed | diverged | missing
    reason: str = ""  # why it is not finished, when known
    overrides: list[str] = field(default_factory=list)  # the job's command-line overrides (Hydra runs)
    label: str = ""  # the variant, as shown in the table (set by `label_runs`)
    job: int | None = None  # Hydra's job number in a multirun
    evaluation: pd.DataFrame = field(
        default_factory=pd.DataFrame
    )  # dfw.eval's results.csv rows (evaluation.py)

    def last(self, key: str) -> float:
        """The last value logged for `key` (nan when never logged)."""
        if key not in self.history:
            return math.nan
        values = self.history[key].dropna()
        return float(values.iloc[-1]) if len(values) else math.nan

    def val_curve(self) -> pd.Series:
        """Every logged val/ppl in logging order, indexed by step (the value before fine-tuning included)."""
        if VAL_PPL not in self.history:
            return pd.Series(dtype=float)
        rows = self.history[[STEP, VAL_PPL]].dropna()
        return pd.Series(rows[VAL_PPL].to_numpy(), index=rows[STEP].to_numpy())

    @property
    def _has_converted(self) -> bool:
        # train.py validates the converted model before fit() unless told not to or resuming.
        return bool(self.config.get("validate_before_fit", True)) and not self.config.get("ckpt_path")

    def _validations(self) -> tuple[list[float], list[float]]:
        """val/ppl of the validations before fine-tuning (as converted, then after attention transfer, each
        when it ran) and of those during fine-tuning, in logging order. Before fine-tuning: logged at step 0
        before the first `train/loss`; a history without one (another source) counts the converted model's
        alone."""
        if VAL_PPL not in self.history:
            return [], []
        values = self.history[VAL_PPL]
        trained = self.history[TRAIN_LOSS].notna().to_numpy() if TRAIN_LOSS in self.history else None
        if trained is not None and trained.any() and STEP in self.history:
            first = int(trained.argmax())  # position of the first row with a training loss
            early = (self.history[STEP] == 0).to_numpy() & (np.arange(len(values)) < first)
            before, during = values[early].dropna(), values[~early].dropna()
        else:
            split = 1 if self._has_converted else 0
            before, during = values.dropna().iloc[:split], values.dropna().iloc[split:]
        return [float(v) for v in before], [float(v) for v in during]

    @property
    def val_ppl_converted(self) -> float:
        before, _ = self._validations()
        return before[0] if self._has_converted and before else math.nan

    @property
    def val_ppl_transfer(self) -> float:
        """val/ppl after attention transfer (dfw/transfer.py), before fine-tuning; nan when none ran."""
        before, _ = self._validations()
        after_converted = before[1:] if self._has_converted else before
        return after_converted[0] if after_converted else math.nan

    @property
    def val_ppl(self) -> float:
        """The best val/ppl of fine-tuning (what ModelCheckpoint keeps and the test evaluates)."""
        _, during = self._validations()
        return min(during) if during else math.nan

    @property
    def tokens_per_sec(self) -> float:
        if TOKENS_PER_SEC not in self.history:
            return math.nan
        values = self.history[TOKENS_PER_SEC].dropna()
        return float(values.median()) if len(values) else math.nan

    @property
    def state_size(self) -> float:
        logged = self.last(STATE_SIZE)
        if not math.isnan(logged):
            return logged
        configured = self.config.get("attention.state_size")
        return float(configured) if isinstance(configured, int | float) else math.nan


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in flat.items()}


def _run_config(logged: dict[str, Any] | None) -> dict[str, Any]:
    """The run config from what a logger stored: LanguageModel saves it under "config"."""
    logged = logged or {}
    return flatten(logged.get("config", logged) or {})


# --- A local run, a Hydra multirun --------------------------------------------------------------------------


def read_csv_run(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame] | None:
    """(config, history) from Lightning's CSVLogger files, or None when the run wrote none."""
    metrics = run_dir / "csv" / "metrics.csv"
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return None
    hparams = run_dir / "csv" / "hparams.yaml"
    config = yaml.safe_load(hparams.read_text()) if hparams.is_file() else {}
    return _run_config(config), pd.read_csv(metrics)


def _last_error_line(run_dir: Path) -> str:
    """The last line of the run's Hydra log (`<job name>.log`) that reports an error, if any."""
    for log_file in sorted(run_dir.glob("*.log")):
        errors = [
            line
            for line in log_file.read_text(errors="replace").splitlines()
            if "ERROR" in line or "Error" in line
        ]
        if errors:
            return errors[-1].split(" - ", 1)[-1].strip()
    return ""


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _job_number(run_dir: Path) -> int | None:
    """Hydra's job number: `hydra.job.num` in .hydra/hydra.yaml, else the `<num>_` of the folder name."""
    number = ((_yaml(run_dir / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}).get("job", {}).get("num")
    if isinstance(number, int):
        return number
    match = re.match(r"^(\d+)_", run_dir.name)
    return int(match.group(1)) if match else None


def read_run_dir(run_dir: Path) -> Run:
    """One local run (a Hydra job directory, or any directory a run wrote)."""
    run = Run(
        name=run_dir.name,
        source=str(run_dir),
        config={},
        history=pd.DataFrame(),
        overrides=list(_yaml(run_dir / ".hydra" / "overrides.yaml") or []),
        job=_job_number(run_dir),
    )
    csv_run = read_csv_run(run_dir)
    if csv_run is not None:
        run.config, run.history = csv_run
    if not run.config:  # the run failed before its logger wrote hparams.yaml: Hydra's copy of the config
        run.config = flatten(_yaml(run_dir / ".hydra" / "config.yaml") or {})
    interrupted = (
        run_dir / "checkpoints" / "on-exception.ckpt"
    ).is_file()  # Lightning's OnExceptionCheckpoint
    run.status, run.reason = run_status(run, error=_last_error_line(run_dir), interrupted=interrupted)
    run.evaluation = read_evaluation(run_dir)
    busy = holder(
        run_dir
    )  # the lock of a live run (dfw.run_folder): still in progress, whatever it logged so far
    if busy is not None:
        run.status, run.reason = (
            "running",
            f"in progress (pid {busy.get('pid', '?')} on {busy.get('host', '?')})",
        )
    elif (
        csv_run is None and not run.config and not run.evaluation.empty
    ):  # a model evaluated, not trained here
        first = run.evaluation.iloc[0]
        run.status, run.reason = "evaluated", f"evaluated only: {first['model']}"
        state_size = float(first["state_size"]) if pd.notna(first["state_size"]) else None
        run.config = {"attention.name": first["attention"], "attention.state_size": state_size}
    elif run.status == "finished" and (missing := _missing_export(run, run_dir)):
        run.status, run.reason = "export failed", f"trained and tested, but {missing} holds no exported model"
    return run


def _missing_export(run: Run, run_dir: Path) -> str:
    """The export folder the run was to write and did not (its config.json is missing), or "" when none was
    due. An export inside the run folder is looked up in `run_dir`, so a moved or copied run reads the
    same."""
    export_dir, output_dir = run.config.get("export_dir"), run.config.get("paths.output_dir")
    if not export_dir:
        return ""
    export = Path(str(export_dir))
    if output_dir and export.is_relative_to(str(output_dir)):
        export = run_dir / export.relative_to(str(output_dir))
    return "" if (export / "config.json").is_file() else str(export)


def run_status(run: Run, error: str = "", interrupted: bool = False) -> tuple[str, str]:
    """(status, reason) from what the run logged: crashed (with `error`, the run's last error line, when
    known), diverged (a perplexity that is not finite) or finished."""
    if run.history.empty or STEP not in run.history:
        return "crashed", error or "no metrics logged"
    if interrupted:
        return "crashed", error or f"interrupted at step {int(run.history[STEP].max())}"
    max_steps = run.config.get("trainer.max_steps")
    wants_test = run.config.get("test", True)
    reached = int(run.history[STEP].max())
    if (wants_test and math.isnan(run.last(TEST_PPL))) or (not wants_test and math.isnan(run.val_ppl)):
        if max_steps and reached >= max_steps and not error:  # NaN and never-logged read back the same
            return (
                "crashed",
                f"trained {reached} of {max_steps} steps but logged no perplexity (NaN, or stopped in the "
                "test)",
            )
        return "crashed", error or f"stopped at step {reached}" + (f" of {max_steps}" if max_steps else "")
    if not all(math.isfinite(value) for value in (run.val_ppl, run.last(TEST_PPL)) if not math.isnan(value)):
        return "diverged", "perplexity is not finite"
    return "finished", ""


def expected_jobs(multirun_dir: Path) -> list[list[str]] | None:
    """The overrides of every job a Hydra multirun was to run, in job order, from the multirun.yaml Hydra
    writes; None when the directory is not a multirun of Hydra's basic sweeper.

    The basic sweeper's expansion, through Hydra's public override parser: the sweeper's `params` first,
    then the command line; a key given twice keeps its first position and its last value; the jobs are
    the Cartesian product in that key order (the last key varies fastest).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = _yaml(multirun_dir / "multirun.yaml")
    hydra_cfg = (multirun or {}).get("hydra") or {}
    sweeper = hydra_cfg.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    arguments = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    arguments += list((hydra_cfg.get("overrides") or {}).get("task") or [])
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise ConfigError(
                    f"{multirun_dir}/multirun.yaml: {key} is a range or interval sweep, which the basic "
                    "sweeper does not run"
                )
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]


def _run_dirs(root: Path) -> list[Path]:
    """Every directory under `root` that a run wrote (its CSV logs, or Hydra's copy of its config)."""
    marks = ("csv/metrics.csv", ".hydra/config.yaml", str(EVAL_RESULTS))
    return sorted(
        {
            path.parents[1]
            for mark in marks
            for path in root.rglob(mark)
            if len(path.relative_to(root).parts) <= 6
        }
    )


def load_local(root: Path) -> list[Run]:
    """Every run under `root`, plus the jobs of its multirun that never started (status missing). `root` may
    also hold several multiruns, one per folder (sweeps/eval_grid.sh): each is checked for missing jobs."""
    runs = [read_run_dir(d) for d in _run_dirs(root)]
    sweeps = (
        [root]
        if (root / "multirun.yaml").is_file()
        else sorted(p.parent for p in root.glob("*/multirun.yaml"))
    )
    for sweep in sweeps or [root]:
        jobs = expected_jobs(sweep)
        if jobs is None:
            continue
        inside = lambda run, sweep=sweep: sweep == root or Path(run.source).is_relative_to(sweep)
        started = {run.job for run in runs if inside(run)}
        runs += [
            Run(
                name=f"job {number}",
                source=str(sweep),
                config={},
                history=pd.DataFrame(),
                status="missing",
                reason="never started (the sweep stopped before it)",
                overrides=overrides,
                job=number,
            )
            for number, overrides in enumerate(jobs)
            if number not in started
        ]
    if sweeps:
        sweep_of = lambda run: next(
            (i for i, sweep in enumerate(sweeps) if Path(run.source).is_relative_to(sweep)), -1
        )
        runs.sort(key=lambda run: (sweep_of(run), run.job is None, run.job or 0))  # each sweep in job order
    return runs


# --- A W&B project ------------------------------------------------------------------------------------------


def load_wandb_project(path: str, group: str | None = None, tag: str | None = None) -> list[Run]:
    """Every run of a W&B project (`entity/project`), optionally one group or tag, through `wandb.Api()`."""
    import wandb

    filters: dict[str, Any] = {}
    if group:
        filters["group"] = group
    if tag:
        filters["tags"] = {"$in": [tag]}
    runs = []
    for remote in wandb.Api(timeout=60).runs(path, filters=filters or None):
        history = remote.history(samples=100_000, pandas=True)
        step_key = "trainer/global_step" if "trainer/global_step" in history else "_step"
        if step_key in history:
            history[STEP] = history[step_key]
        config = {k: v for k, v in remote.config.items() if not k.startswith("_")}
        run = Run(name=remote.name, source=remote.url, config=_run_config(config), history=history)
        run.status, run.reason = run_status(run)
        if remote.state != "finished" and run.status == "finished":
            run.status, run.reason = "crashed", f"W&B state {remote.state}"
        runs.append(run)
    return runs


def load_runs(source: str, group: str | None = None, tag: str | None = None) -> list[Run]:
    """The runs of a run or multirun directory, or of a W&B project (`entity/project` or `project`)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return load_local(path)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) or path.exists():
        raise ConfigError(
            f"{source!r} is neither a run or multirun directory nor a W&B project (entity/project)"
        )
    try:
        return load_wandb_project(source, group, tag)
    except Exception as err:  # no network, no credentials, no such project
        raise ConfigError(
            f"could not read W&B project {source!r} ({type(err).__name__}: "
            f"{(str(err).splitlines() or [''])[0][:200]}); without W&B, pass the multirun directory: every "
            "run also writes its metrics to csv/metrics.csv"
        ) from None
