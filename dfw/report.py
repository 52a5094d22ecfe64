"""Compare runs without a dashboard: `python -m dfw.report <multirun dir | W&B project> [--out DIR]`.

Reads every run of a sweep and writes `report.md` (one row per run: variant, state size, validation and
test perplexity, share of softmax quality retained, training tokens/s, state bytes per sequence) and two
plots, `val_ppl_vs_step.png` and `ppl_vs_state_size.png`. Runs that crashed, stopped early or never
started are listed under the table, with the reason where one was logged; none is dropped silently.

Sources, per run, first found first used:
  - a local run directory: `csv/metrics.csv` + `csv/hparams.yaml` (every run writes them), else an offline
    W&B run `wandb/offline-run-*/` (its `run-*.wandb` log, read here without the W&B servers);
  - a Hydra multirun directory: every job directory in it, and its `multirun.yaml`, from which the jobs the
    sweep should have run are listed again, so a job that never started shows up as missing;
  - a W&B project (`entity/project` or `project`), through the W&B API, when online.

Definitions: validation perplexity is the best one logged during fine-tuning (the checkpoint the test
evaluates), `converted` the one before any fine-tuning; share retained = softmax val ppl / run val ppl,
with the sweep's softmax run as the reference (1.0 = as good as softmax); training tokens/s is the median
of `train/device/items_per_sec`; state bytes per sequence is `model/state_bytes_per_sequence` (float32,
after `data.block_size` tokens; softmax's KV cache grows with the context, the other states do not).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

log = logging.getLogger("dfw.report")

STEP = "step"
VAL_PPL, TEST_PPL, TOKENS_PER_SEC = "val/ppl", "test/ppl", "train/device/items_per_sec"
STATE_BYTES, STATE_SIZE, PARAMS_NEW = "model/state_bytes_per_sequence", "model/state_size", "model/params_new"
# Config keys that differ between runs without making them different experiments.
VOLATILE_KEYS = re.compile(
    r"^(paths|hydra)\.|(dirpath|save_dir|default_root_dir|export_dir|cache_dir|ckpt_path|enable_progress_bar)$"
    r"|^logger\.wandb\.(name|id|group|tags|mode)|^module\.scheduler\.num_training_steps$"
)


@dataclass
class Run:
    """One run of a sweep, as read back from its logs."""

    name: str                                   # job directory (`3_decay`) or W&B run name
    source: str                                 # where it was read from
    config: dict[str, Any]                      # the resolved run config, flattened: {"attention.name": ...}
    history: pd.DataFrame                       # one row per logged step: `step` and metric columns
    status: str = "finished"                    # finished | crashed | diverged | missing
    reason: str = ""                            # why it is not finished, when known
    overrides: list[str] = field(default_factory=list)  # the job's command-line overrides (Hydra runs)
    label: str = ""                             # the variant, as shown in the table (set by `label_runs`)
    job: int | None = None                      # Hydra's job number in a multirun

    def last(self, key: str) -> float:
        """The last value logged for `key` (nan when never logged)."""
        if key not in self.history:
            return math.nan
        values = self.history[key].dropna()
        return float(values.iloc[-1]) if len(values) else math.nan

    def _val_rows(self) -> pd.Series:
        """Every logged val/ppl, in logging order, indexed by step."""
        if VAL_PPL not in self.history:
            return pd.Series(dtype=float)
        rows = self.history[[STEP, VAL_PPL]].dropna()
        return pd.Series(rows[VAL_PPL].to_numpy(), index=rows[STEP].to_numpy())

    @property
    def _has_converted(self) -> bool:
        # train.py validates the converted model before fit() unless told not to or resuming.
        return bool(self.config.get("validate_before_fit", True)) and not self.config.get("ckpt_path")

    def val_curve(self) -> pd.Series:
        """val/ppl by step, the value before fine-tuning (at step 0) included."""
        return self._val_rows()

    @property
    def val_ppl_converted(self) -> float:
        rows = self._val_rows()
        return float(rows.iloc[0]) if self._has_converted and len(rows) else math.nan

    @property
    def val_ppl(self) -> float:
        """The best val/ppl of fine-tuning (what ModelCheckpoint keeps and the test evaluates)."""
        rows = self._val_rows().iloc[1 if self._has_converted else 0 :]
        return float(rows.min()) if len(rows) else math.nan

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


# --- Reading runs -------------------------------------------------------------------------------------------


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in flat.items()}


def read_csv_run(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame] | None:
    """(config, history) from Lightning's CSVLogger files, or None when the run wrote none."""
    metrics = run_dir / "csv" / "metrics.csv"
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return None
    history = pd.read_csv(metrics)
    hparams = run_dir / "csv" / "hparams.yaml"
    config = yaml.safe_load(hparams.read_text()) if hparams.is_file() else {}
    # LanguageModel saves the run config under "config"; log_hyperparams(config) writes it at the top.
    config = (config or {}).get("config", config) or {}
    return flatten(config), history


def wandb_records(path: Path):
    """The protobuf Records of a `run-*.wandb` file (W&B's LevelDB-style log: 32 KiB blocks of chunks
    with a 7-byte header crc32 / length / type; the file starts with a 7-byte W&B header).

    Written here because W&B reads these files only in its Go service; format as in W&B's `datastore.py`.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    block, header = 32768, 7
    ident, _magic, _version = struct.unpack("<4sHB", data[:header])
    if ident != b":W&B":
        raise ValueError(f"{path} is not a W&B run log (header {ident!r})")
    position, pending = header, b""
    while position + header <= len(data):
        if block - position % block < header:  # the rest of a block too short for a header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + header])
        chunk = data[position + header : position + header + length]
        position += header + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            position += block - position % block if position % block else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def _history_value(item: Any) -> Any:
    return json.loads(item.value_json) if item.value_json else None


def read_wandb_offline_run(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame, bool] | None:
    """(config, history, finished) from an offline W&B run directory `offline-run-*`, or None."""
    logs = sorted(run_dir.glob("run-*.wandb"))
    if not logs:
        return None
    config: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    finished = False
    for record in wandb_records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {"/".join(item.nested_key) or item.key: _history_value(item) for item in record.history.item}
            rows.append(row)
        elif kind == "exit":
            finished = record.exit.exit_code == 0
    history = pd.DataFrame(rows)
    if "trainer/global_step" in history:
        history[STEP] = history["trainer/global_step"]
    elif "_step" in history:
        history[STEP] = history["_step"]
    config.pop("_wandb", None)
    config = config.get("config", config)
    return flatten(config), history, finished


def _last_error_line(run_dir: Path) -> str:
    """The last line of the run's Hydra log (`<job name>.log`) that reports an error, if any."""
    for log_file in sorted(run_dir.glob("*.log")):
        errors = [line for line in log_file.read_text(errors="replace").splitlines() if "ERROR" in line or "Error" in line]
        if errors:
            return errors[-1].split(" - ", 1)[-1].strip()
    return ""


def read_run_dir(run_dir: Path) -> Run:
    """One local run (a Hydra job directory, or any directory a run wrote)."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = list(yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.is_file() else []
    run = Run(name=run_dir.name, source=str(run_dir), config={}, history=pd.DataFrame(), overrides=overrides,
              job=_job_number(run_dir))  # fmt: skip
    finished_by_wandb = None
    csv_run = read_csv_run(run_dir)
    if csv_run is not None:
        run.config, run.history = csv_run
    else:
        for wandb_dir in sorted(run_dir.glob("wandb/offline-run-*")):
            wandb_run = read_wandb_offline_run(wandb_dir)
            if wandb_run is not None:
                run.config, run.history, finished_by_wandb = wandb_run
                run.source = str(wandb_dir)
                break
    if not run.config and (run_dir / ".hydra" / "config.yaml").is_file():
        run.config = flatten(yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()))
    run.status, run.reason = _status(run, run_dir, finished_by_wandb)
    return run


def _status(run: Run, run_dir: Path | None, finished_by_wandb: bool | None = None) -> tuple[str, str]:
    error = _last_error_line(run_dir) if run_dir is not None else ""
    if run.history.empty or STEP not in run.history:
        return "crashed", error or "no metrics logged"
    if run_dir is not None and (run_dir / "checkpoints" / "on-exception.ckpt").is_file():
        return "crashed", error or f"interrupted at step {int(run.history[STEP].max())}"
    if finished_by_wandb is False:
        return "crashed", error or "the W&B run did not exit cleanly"
    max_steps = run.config.get("trainer.max_steps")
    wants_test = run.config.get("test", True)
    if (wants_test and math.isnan(run.last(TEST_PPL))) or (not wants_test and math.isnan(run.val_ppl)):
        reached = int(run.history[STEP].max())
        if max_steps and reached >= max_steps and not error:  # NaN and never-logged read back the same
            return "crashed", f"trained {reached} of {max_steps} steps but logged no perplexity (NaN, or stopped in the test)"
        return "crashed", error or f"stopped at step {reached}" + (f" of {max_steps}" if max_steps else "")
    if not all(math.isfinite(value) for value in (run.val_ppl, run.last(TEST_PPL)) if not math.isnan(value)):
        return "diverged", "perplexity is not finite"
    return "finished", ""


def expected_jobs(multirun_dir: Path) -> list[list[str]] | None:
    """The overrides of every job a Hydra multirun was to run, in job order (from its multirun.yaml);
    None when it is not a multirun of Hydra's basic sweeper."""
    config_file = multirun_dir / "multirun.yaml"
    if not config_file.is_file():
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    hydra_cfg = OmegaConf.load(config_file).hydra
    if not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = hydra_cfg.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(hydra_cfg.overrides.task)
    # The sweeper's own expansion (BasicSweeper.sweep does exactly this), so job i here is job i there.
    overrides = OverridesParser.create().parse_overrides(arguments)
    return BasicSweeper.split_arguments(overrides, None)[0]


def _job_number(run_dir: Path) -> int | None:
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        number = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("job", {}).get("num")
        if isinstance(number, int):
            return number
    match = re.match(r"^(\d+)_", run_dir.name)
    return int(match.group(1)) if match else None


def _run_dirs(root: Path) -> list[Path]:
    marks = ("csv/metrics.csv", ".hydra/config.yaml")
    dirs = {path.parents[1] for mark in marks for path in root.rglob(mark) if len(path.relative_to(root).parts) <= 6}
    dirs |= {path.parents[1] for path in root.rglob("wandb/offline-run-*") if path.is_dir()}
    # A run's own subfolders (wandb/, csv/) are not runs.
    return sorted(d for d in dirs if "wandb" not in d.relative_to(root).parts)


def load_local(root: Path) -> list[Run]:
    """Every run under `root`, plus the jobs of its multirun that never started (status missing)."""
    runs = [read_run_dir(d) for d in _run_dirs(root)]
    jobs = expected_jobs(root)
    if jobs is not None:
        started = {run.job for run in runs}
        runs += [
            Run(name=f"job {number}", source=str(root), config={}, history=pd.DataFrame(), status="missing",
                reason="never started (the sweep stopped before it)", overrides=overrides, job=number)
            for number, overrides in enumerate(jobs) if number not in started
        ]  # fmt: skip
        runs.sort(key=lambda run: (run.job is None, run.job or 0))
    return runs


def load_wandb_project(path: str, group: str | None = None, tag: str | None = None) -> list[Run]:
    """Every run of a W&B project (`entity/project`), optionally one group or tag, through the W&B API."""
    import wandb

    filters: dict[str, Any] = {}
    if group:
        filters["group"] = group
    if tag:
        filters["tags"] = {"$in": [tag]}
    runs = []
    for remote in wandb.Api(timeout=60).runs(path, filters=filters or None):
        config = {k: v for k, v in remote.config.items() if not k.startswith("_")}
        history = remote.history(samples=100_000, pandas=True)
        if "trainer/global_step" in history:
            history[STEP] = history["trainer/global_step"]
        elif "_step" in history:
            history[STEP] = history["_step"]
        run = Run(name=remote.name, source=remote.url, config=flatten(config.get("config", config)), history=history)
        run.status, run.reason = _status(run, None)
        if remote.state != "finished" and run.status == "finished":
            run.status, run.reason = "crashed", f"W&B state {remote.state}"
        runs.append(run)
    return runs


def load_runs(source: str, group: str | None = None, tag: str | None = None) -> list[Run]:
    path = Path(source).expanduser()
    if path.is_dir():
        return load_local(path)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) or path.exists():
        raise SystemExit(f"error: {source!r} is neither a run or multirun directory nor a W&B project (entity/project)")
    try:
        return load_wandb_project(source, group, tag)
    except Exception as err:  # no network, no credentials, no such project
        raise SystemExit(
            f"error: could not read W&B project {source!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "without W&B, pass the multirun directory: its offline runs are read from disk"
        ) from None


# --- The report ---------------------------------------------------------------------------------------------


def label_runs(runs: list[Run]) -> None:
    """Variant label = attention.name + the config values that differ between the finished runs of that
    attention; a run that did not finish is named by its own overrides among the sweep's."""
    common = set.intersection(*(set(run.overrides) for run in runs)) if runs else set()
    for run in runs:
        run.overrides = [o for o in run.overrides if o not in common]
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        if run.status in ("finished", "diverged"):  # their configs are the resolved ones the runs logged
            by_name.setdefault(str(run.config.get("attention.name", "?")), []).append(run)
        else:
            run.label = " ".join(run.overrides) or run.name
    for name, group in by_name.items():
        keys = sorted({k for run in group for k in run.config if not VOLATILE_KEYS.search(k)})
        varying = [k for k in keys if len({json.dumps(run.config.get(k), default=str) for run in group}) > 1]
        for run in group:
            details = ", ".join(f"{k.rsplit('.', 1)[-1]}={run.config.get(k)}" for k in varying)
            run.label = f"{name} ({details})" if details else name


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _fmt_bytes(value: float) -> str:
    if math.isnan(value):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return ""


def reference_ppl(runs: list[Run], baseline: str) -> float:
    """Validation perplexity of the best finished `baseline` run (nan when there is none)."""
    values = [r.val_ppl for r in runs if r.status == "finished" and r.config.get("attention.name") == baseline]
    return min(values) if values else math.nan


def markdown(runs: list[Run], baseline: str = "softmax", title: str = "") -> str:
    reference = reference_ppl(runs, baseline)
    done = [r for r in runs if r.status in ("finished", "diverged")]
    done.sort(key=lambda r: r.config.get("attention.name") != baseline)  # the reference first, then job order
    lines = [f"## {title}", ""] if title else []
    lines += [
        "| variant | state size m | val ppl, converted | val ppl | test ppl | softmax quality retained "
        "| train tokens/s | state bytes / sequence | steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in done:
        share = reference / run.val_ppl if run.val_ppl > 0 else math.nan
        m = run.state_size
        lines.append(
            f"| {run.label} | {'—' if math.isnan(m) else int(m)} | {_fmt(run.val_ppl_converted)} | {_fmt(run.val_ppl)} "
            f"| {_fmt(run.last(TEST_PPL))} | {'—' if math.isnan(share) else f'{100 * share:.1f}%'} "
            f"| {_fmt(run.tokens_per_sec, 0)} | {_fmt_bytes(run.last(STATE_BYTES))} | {int(run.history[STEP].max())} |"
        )
    if math.isnan(reference):
        lines += ["", f"No finished `{baseline}` run: the share of softmax quality retained is not computed."]
    problems = [r for r in runs if r.status != "finished"]
    if problems:
        lines += ["", "Runs not in the table, or not finished:", "", "| run | status | reason | overrides |", "|---|---|---|---|"]
        lines += [f"| {r.name} | {r.status} | {r.reason} | {' '.join(r.overrides)} |" for r in problems]
    lines += [
        "",
        f"val ppl: best validation perplexity of fine-tuning (converted: before it); softmax quality retained = "
        f"{baseline} val ppl / val ppl; train tokens/s: median over training; state bytes / sequence: generation "
        "state of one sequence after a training-length context, float32 (softmax: the KV cache, which grows with "
        "the context).",
    ]
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], out_dir: Path, baseline: str = "softmax") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    done = [r for r in runs if r.status in ("finished", "diverged")]
    paths = [out_dir / "val_ppl_vs_step.png", out_dir / "ppl_vs_state_size.png"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in done:
        curve = run.val_curve()
        ax.plot(curve.index, curve.values, marker="o", markersize=3, label=run.label)
    ax.set(xlabel="optimizer step", ylabel="validation perplexity", yscale="log", title="Validation perplexity (step 0: as converted)")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    reference = reference_ppl(runs, baseline)
    if not math.isnan(reference):
        ax.axhline(reference, color="black", linestyle="--", linewidth=1, label=f"{baseline} (KV cache grows with the context)")
    by_name: dict[str, list[Run]] = {}
    for run in done:
        if not math.isnan(run.state_size):
            by_name.setdefault(str(run.config.get("attention.name")), []).append(run)
    for name, group in by_name.items():
        group.sort(key=lambda r: r.state_size)
        line, = ax.plot([r.state_size for r in group], [r.val_ppl for r in group], marker="o", label=name)
        if len(group) > 1 or len(by_name) < len(done):
            for r in group:
                if r.label != name:
                    ax.annotate(r.label.removeprefix(name).strip(" ()"), (r.state_size, r.val_ppl), fontsize=6, color=line.get_color())
    ax.set_xscale("log", base=2)
    sizes = sorted({r.state_size for group in by_name.values() for r in group})
    if sizes:
        ax.set_xticks(sizes)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%d"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="state size m (features per head)", ylabel="validation perplexity", title="Validation perplexity against state size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def report(source: str, out_dir: str | Path | None = None, baseline: str = "softmax", group: str | None = None,
           tag: str | None = None) -> Path:  # fmt: skip
    """Read the runs of `source`, write report.md and the plots into `out_dir`; returns report.md's path."""
    runs = load_runs(source, group, tag)
    if not runs:
        raise SystemExit(f"error: no runs found in {source!r} (a run directory holds csv/metrics.csv or wandb/offline-run-*)")
    label_runs(runs)
    local = Path(source).expanduser().is_dir()
    out = Path(out_dir) if out_dir else (Path(source) / "report" if local else Path("outputs/reports") / source.replace("/", "_"))
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(runs, baseline)
    plots = plot(runs, out, baseline)
    body = text + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    (out / "report.md").write_text(body)
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfw.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a multirun (or run) directory, or a W&B project entity/project")
    parser.add_argument("--out", help="where to write report.md and the plots (default: <source>/report)")
    parser.add_argument("--baseline", default="softmax", help="attention.name of the reference run (default: softmax)")
    parser.add_argument("--group", help="W&B only: the runs of this group")
    parser.add_argument("--tag", help="W&B only: the runs with this tag")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = report(args.source, args.out, args.baseline, args.group, args.tag)
    print(path.read_text().split("\n![")[0])
    print(f"written to {path} (plots beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
