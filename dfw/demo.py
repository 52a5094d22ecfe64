"""The whole method, small, offline, on a CPU: `python -m dfw.demo [key=value ...]`.

1. Pretrain a small softmax GPT-2 on the embedded Shakespeare corpus (`experiment=demo_teacher`);
   cached by its config, so a second run reuses it.
2. Fine-tune it as it is, softmax, for the fine-tuning budget (`experiment=demo_finetune`): the
   baseline. The teacher is small and briefly trained, so extra steps help it too; comparing DFW
   with the teacher as pretrained would credit the conversion with those steps.
3. Convert the teacher to decaying fast weights, calibrate its output scale and run attention transfer
   for a quarter of the budget (`recipe=transfer_finetune`, dfw/transfer.py), then fine-tune it with
   the same recipe for the rest: as many training tokens as the softmax baseline.
4. The same conversion and budget once more with a 16-token softmax window in every layer
   (`attention.window=16`, docs/hybrids.md): one more row, fine-tuned.
5. Print validation perplexities and the share of softmax quality retained = softmax ppl / DFW ppl
   (100% = as good as softmax with the same fine-tuning budget).

Overrides go to both fine-tuning stages (`trainer.max_steps=100`); prefix them with `teacher.` for the
pretraining stage (`teacher.trainer.max_steps=200`; `teacher.experiment=recall_teacher` pretrains the
teacher that can copy and recall instead). `--teacher-only` runs (or reuses) stage 1 and
prints the teacher's directory as the last line, for sweeps that convert the same teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import run_or_exit
from .presets import compose
from .train import train

log = logging.getLogger("dfw.demo")
# What decides the teacher's weights; everything else (logging, paths) may change without retraining.
TEACHER_KEYS = ("model", "attention", "data", "module", "trainer", "seed")
# How dfw trains a softmax teacher, beyond its config: raised when that changes, so no cached teacher trained
# the old way is reused. 2: attention=softmax is GPT-2's own attention (attention dropout in training).
TEACHER_VERSION = 2


def _compose(overrides: list[str]) -> DictConfig:
    return compose("train", overrides)


def _teacher_key(cfg: DictConfig) -> str:
    fields = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg[key], DictConfig) else cfg[key]
        for key in TEACHER_KEYS
    }
    for volatile in ("default_root_dir", "enable_progress_bar"):
        fields["trainer"].pop(volatile, None)
    fields["data"].pop("cache_dir", None)
    fields["data"].pop("num_workers", None)
    # An attention option at null is an option that is off (softmax_layers: null, added after teachers were
    # cached): leaving it out keeps the key, and so the cached teacher, of a teacher trained the same way.
    fields["attention"] = {k: v for k, v in fields["attention"].items() if v is not None}
    fields["teacher_version"] = TEACHER_VERSION
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_teacher(overrides: list[str], run_dir: Path) -> tuple[Path, dict[str, float]]:
    """Stage 1, or its cached result: (export directory, metrics). `experiment=<name>` among the overrides
    pretrains another teacher recipe instead of demo_teacher (e.g. recall_teacher), cached the same way."""
    experiment = next((o for o in overrides if o.startswith("experiment=")), "experiment=demo_teacher")
    overrides = [o for o in overrides if not o.startswith("experiment=")]
    cfg = _compose([experiment, f"paths.output_dir={run_dir / 'teacher'}", *overrides])
    teacher_dir = Path(cfg.paths.cache_dir) / "teachers" / _teacher_key(cfg)
    metrics_file = teacher_dir / "metrics.json"
    if metrics_file.is_file():
        log.info("reusing the softmax teacher pretrained earlier: %s", teacher_dir)
        return teacher_dir, json.loads(metrics_file.read_text())
    log.info("stage 1: pretraining the softmax teacher (cached afterwards in %s)", teacher_dir)
    cfg.export_dir = str(teacher_dir)
    metrics = train(cfg)
    metrics_file.write_text(json.dumps(metrics, indent=2))  # written last: marks the cache entry complete
    return teacher_dir, metrics


# Stage 3's attention: DFW as preset, m = the teacher's head size (128 / 4 heads = 32), so the feature
# map starts at the identity.
DFW = ["attention=decay"]
SOFTMAX = ["attention=softmax"]
# Stage 4's: DFW with exact softmax over the last 16 tokens (an eighth of the demo's 128-token context).
WINDOW = 16
DFW_WINDOW = [*DFW, f"attention.window={WINDOW}"]


def finetune(
    teacher_dir: Path, attention: list[str], overrides: list[str], run_dir: Path
) -> dict[str, float]:
    """Stages 2 and 3: convert the teacher (or not, for softmax), validate it as converted, fine-tune,
    test."""
    common = [
        "experiment=demo_finetune",
        *attention,
        f"model.pretrained={teacher_dir}",
        f"model.tokenizer={teacher_dir}",
    ]
    cfg = _compose([*common, *overrides])
    if attention != SOFTMAX:
        # The same training steps (tokens) as softmax: a quarter for attention transfer, the rest fine-tuning.
        budget = cfg.trainer.max_steps
        transfer = max(1, budget // 4)
        interval = cfg.trainer.val_check_interval  # validate at the last fine-tuning step too
        interval = interval if (budget - transfer) % interval == 0 else budget - transfer
        recipe = [
            "recipe=transfer_finetune",
            f"budget_steps={budget}",
            f"transfer.steps={transfer}",
            f"trainer.val_check_interval={interval}",
        ]
        kept = [
            o for o in overrides if not o.startswith(("trainer.max_steps=", "trainer.val_check_interval="))
        ]
        cfg = _compose([*common, *kept, *recipe])
    window = cfg.attention.get("window")
    folder = cfg.attention.name + (f"-window{window}" if window else "")
    cfg.paths.output_dir = str(run_dir / folder)
    log.info("fine-tuning the teacher with attention=%s", folder)
    return train(cfg)


def results_table(
    teacher: dict[str, float],
    softmax: dict[str, float],
    dfw: dict[str, float],
    dfw_window: dict[str, float] | None = None,
) -> str:
    best = lambda metrics: metrics.get("val/ppl_best", metrics["val/ppl"])
    reference = best(softmax)  # softmax after the same fine-tuning budget as DFW
    share = lambda ppl: f"{100 * reference / ppl:.1f}%"
    rows = [
        ("softmax teacher, as pretrained", best(teacher)),
        ("softmax, fine-tuned", reference),
        ("DFW, right after conversion", dfw["val/ppl_converted"]),
        ("DFW, after attention transfer", dfw["val/ppl_transfer"]),
        ("DFW, fine-tuned", best(dfw)),
    ]
    if dfw_window is not None:
        rows.append((f"DFW with a {WINDOW}-token window, fine-tuned", best(dfw_window)))
    lines = ["| model | validation perplexity | softmax quality retained |", "|---|---:|---:|"]
    lines += [f"| {name} | {ppl:.2f} | {share(ppl)} |" for name, ppl in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    flags = [a for a in argv if a.startswith("-") and a != "--teacher-only"]
    if flags:
        print(
            f"error: dfw.demo has no option {flags[0]}; it takes --teacher-only and Hydra overrides "
            "(key=value, teacher.key=value for the pretraining stage); --help says more",
            file=sys.stderr,
        )
        return 2
    teacher_only = "--teacher-only" in argv
    argv = [a for a in argv if a != "--teacher-only"]
    teacher_overrides = [a.removeprefix("teacher.") for a in argv if a.startswith("teacher.")]
    student_overrides = [a for a in argv if not a.startswith("teacher.")]
    run_dir = Path("outputs/demo") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    teacher_dir, teacher = run_or_exit(pretrain_teacher, teacher_overrides, run_dir, logger=log)
    if teacher_only:
        print(teacher_dir.resolve())
        return 0
    softmax = run_or_exit(finetune, teacher_dir, SOFTMAX, student_overrides, run_dir, logger=log)
    dfw = run_or_exit(finetune, teacher_dir, DFW, student_overrides, run_dir, logger=log)
    dfw_window = run_or_exit(finetune, teacher_dir, DFW_WINDOW, student_overrides, run_dir, logger=log)
    log.info(
        "DFW with a %d-token window: validation ppl %.2f right after conversion, %.2f after transfer",
        WINDOW,
        dfw_window["val/ppl_converted"],
        dfw_window["val/ppl_transfer"],
    )
    table = results_table(teacher, softmax, dfw, dfw_window)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.md").write_text(table + "\n")
    print(
        "\n"
        + table
        + "\n\nsoftmax quality retained = validation ppl of softmax fine-tuned with the same budget / "
        f"validation ppl of the row; written to {run_dir}/results.md"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
