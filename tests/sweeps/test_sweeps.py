"""The sweeps in both forms (Hydra multirun experiment, W&B sweep file) define the same runs, every run
composes and builds its attention, and the multi-GPU / SLURM configs build what they promise."""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dfw.report import expected_jobs
from tests.attention.helpers import build_at_gpt2_shapes
from tests.conftest import CONF, REPO, compose

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
PRESETS = sorted(p.stem for p in (CONF / "attention").glob("*.yaml"))


def _wandb_grid(spec: dict) -> list[set[str]]:
    """The runs of a W&B grid sweep, each as the set of Hydra overrides its agent passes."""
    keys = list(spec["parameters"])
    values = [
        spec["parameters"][k]["values"]
        if "values" in spec["parameters"][k]
        else [spec["parameters"][k]["value"]]
        for k in keys
    ]
    return [{f"{k}={v}" for k, v in zip(keys, combo, strict=True)} for combo in itertools.product(*values)]


def _hydra_config(*overrides: str):
    """The `hydra` node `python -m dfw.train -m <overrides>` runs with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra


def _hydra_grid(experiment: str, tmp_path: Path) -> list[set[str]]:
    """The jobs of `python -m dfw.train -m experiment=<experiment>`, expanded as Hydra's basic sweeper does
    (by dfw.report's reading of the multirun.yaml Hydra writes)."""
    hydra_node = _hydra_config(f"experiment={experiment}")
    OmegaConf.save(
        OmegaConf.create({"hydra": OmegaConf.to_container(hydra_node)}), tmp_path / "multirun.yaml"
    )
    return [set(job) - {f"experiment={experiment}"} for job in expected_jobs(tmp_path)]


def test_every_comparison_of_the_paper_has_a_sweep():
    assert {p.stem for p in SWEEPS} >= {
        "compare_attention",
        "rule_x_feature_map",
        "state_size",
        "learning_rate",
    }


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_wandb_sweep_runs_the_hydra_experiment_with_the_same_grid(sweep, tmp_path):
    spec = yaml.safe_load(sweep.read_text())
    # The agent must pass Hydra overrides (key=value), not argparse flags (--key=value).
    assert spec["command"] == ["${env}", "${interpreter}", "-m", "dfw.train", "${args_no_hyphens}"]
    assert spec["method"] == "grid" and spec["metric"]["name"] == "val/ppl"
    experiment = spec["parameters"]["experiment"]["value"]
    assert (CONF / "experiment" / f"{experiment}.yaml").is_file()
    wandb_runs = _wandb_grid(spec)
    hydra_runs = [job | {f"experiment={experiment}"} for job in _hydra_grid(experiment, tmp_path)]
    # W&B renders floats with str(): compare the parsed values.
    normalise = lambda runs: sorted(
        sorted(o.split("=")[0] + "=" + str(yaml.safe_load(o.split("=", 1)[1])) for o in run) for run in runs
    )
    assert normalise(wandb_runs) == normalise(hydra_runs)
    assert len(wandb_runs) >= 3


@pytest.mark.parametrize("experiment", sorted(p.stem for p in SWEEPS) + ["small_grid"])
def test_every_job_composes_builds_its_attention_and_carries_group_and_tags(experiment, tmp_path):
    jobs = _hydra_grid(experiment, tmp_path)
    names = set()
    for job in jobs:
        extra = ["model.pretrained=/unused"] if experiment == "small_grid" else []
        cfg = compose(f"experiment={experiment}", "paths.output_dir=/tmp/unused", *extra, *sorted(job))
        build_at_gpt2_shapes(cfg.attention)
        assert cfg.logger.wandb.group.startswith(f"{experiment}-")
        assert experiment in cfg.logger.wandb.tags
        names.add(cfg.logger.wandb.name)
    assert len(names) == len(jobs), "every run of a sweep needs its own W&B name"


@pytest.mark.parametrize("experiment", ["compare_attention", "small_grid"])
def test_attention_comparisons_cover_every_preset(experiment, tmp_path):
    covered = {
        o.split("=")[1]
        for job in _hydra_grid(experiment, tmp_path)
        for o in job
        if o.startswith("attention=")
    }
    assert covered == set(PRESETS)


def test_the_small_grid_converts_a_given_teacher():
    cfg = compose("experiment=small_grid", "paths.output_dir=/tmp/unused", "model.pretrained=/teacher")
    assert (
        cfg.model.tokenizer == "/teacher" and cfg.model.config is None
    )  # architecture and BPE of the teacher
    unset = compose("experiment=small_grid", "paths.output_dir=/tmp/unused")
    with pytest.raises(Exception, match="DFW_TEACHER"):  # never a silent random-weight model
        _ = unset.model.pretrained


def test_small_grid_script_passes_the_teacher_to_the_sweep_and_reports_it(tmp_path):
    """sweeps/small_grid.sh with a stand-in interpreter (PY) that records its arguments: the teacher the demo
    prints last is the one the multirun converts, and the report reads that multirun's directory."""
    calls = tmp_path / "calls.txt"
    fake_python = tmp_path / "python"
    fake_python.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\necho "pretraining..."\necho /cache/teachers/abc\n'
    )
    fake_python.chmod(0o755)
    env = {**os.environ, "PY": str(fake_python)}
    subprocess.run(
        [REPO / "sweeps" / "small_grid.sh", "trainer.max_steps=3"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    demo, sweep, report = calls.read_text().splitlines()
    assert demo == "-m dfw.demo --teacher-only"
    assert sweep.startswith(
        "-m dfw.train -m experiment=small_grid model.pretrained=/cache/teachers/abc "
        "model.tokenizer=/cache/teachers/abc hydra.sweep.dir=outputs/multirun/small_grid_"
    )
    assert sweep.endswith(" trainer.max_steps=3")
    sweep_dir = sweep.split("hydra.sweep.dir=")[1].split()[0]
    assert report == f"-m dfw.report {sweep_dir}"


def test_ddp_and_fsdp_configs_build_their_strategies():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    ddp = compose("trainer=ddp", "paths.output_dir=/tmp/unused")
    assert isinstance(instantiate(ddp.trainer.strategy), DDPStrategy) and ddp.trainer.devices == -1
    fsdp = instantiate(compose("trainer=fsdp", "paths.output_dir=/tmp/unused").trainer.strategy)
    assert isinstance(fsdp, FSDPStrategy) and fsdp._state_dict_type == "full"
    assert fsdp.kwargs["auto_wrap_policy"]._module_classes == {GPT2Block}


def test_slurm_launcher_is_only_read_when_selected():
    # Plain composition never reads hydra/launcher/slurm.yaml, so it works without the plugin...
    assert compose("paths.output_dir=/tmp/unused").attention.name == "decay"
    launcher = yaml.safe_load((CONF / "hydra" / "launcher" / "slurm.yaml").read_text())
    assert "submitit_slurm" in launcher["defaults"]


def _submitit_installed() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


@pytest.mark.skipif(
    not _submitit_installed(), reason="hydra-submitit-launcher is not installed (pip install -e '.[slurm]')"
)
def test_slurm_launcher_composes_with_the_plugin():
    launcher = _hydra_config("hydra/launcher=slurm").launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node  # one DDP process per GPU, started by SLURM


@pytest.mark.parametrize("experiment", sorted(p.stem for p in SWEEPS) + ["small_grid"])
def test_every_sweep_also_runs_with_csv_logging_only(experiment):
    extra = ["model.pretrained=/unused"] if experiment == "small_grid" else []
    cfg = compose(f"experiment={experiment}", "logger=csv", "paths.output_dir=/tmp/unused", *extra)
    assert list(cfg.logger) == ["csv"]
    assert cfg.group.startswith(f"{experiment}-") and experiment in cfg.tags
