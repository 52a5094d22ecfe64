"""sweeps/eval_grid.sh and its experiments: the recall teacher is the one every run converts, the presets and
DFW's state sizes are the jobs, every job evaluates after training, and the report reads the whole folder."""

from __future__ import annotations

import os
import subprocess

from dfw.data.synthetic import SyntheticOptions
from tests.conftest import CONF, REPO, compose
from tests.sweeps.test_sweeps import PRESETS, _hydra_grid


def test_the_grid_covers_every_preset_and_dfws_state_sizes_and_evaluates_each(tmp_path):
    presets = {
        o.split("=")[1]
        for job in _hydra_grid("eval_grid", tmp_path)
        for o in job
        if o.startswith("attention=")
    }
    assert presets | {"decay"} == set(PRESETS) and "decay" not in presets  # decay runs in eval_state_size
    sizes = [sorted(job) for job in _hydra_grid("eval_state_size", tmp_path)]
    assert sizes == [["attention.state_size=" + m, "attention=decay"] for m in ("8", "16", "32", "64")]
    for experiment in ("eval_grid", "eval_state_size"):
        cfg = compose(f"experiment={experiment}", "model.pretrained=/teacher", "paths.output_dir=/tmp/unused")
        assert list(cfg.eval.tasks) == ["ppl", "copy", "recall"] and cfg.model.tokenizer == "/teacher"
        assert (
            cfg.trainer.max_steps == compose("experiment=small_grid", "model.pretrained=/t").trainer.max_steps
        )


def test_the_recall_teacher_is_the_demo_teacher_with_synthetic_segments():
    demo, recall = compose("experiment=demo_teacher"), compose("experiment=recall_teacher")
    assert recall.model.config == demo.model.config and recall.attention.name == "softmax"
    differs = {
        key for key in demo.trainer if key != "default_root_dir" and recall.trainer[key] != demo.trainer[key]
    }
    assert differs <= {"max_steps"}  # the curriculum trains longer; validation and test are the demo's
    assert demo.data.get("synthetic") is None
    options = SyntheticOptions.from_config(recall.data.synthetic)
    first, last = options.at(0)[0], options.at(recall.trainer.max_steps)[0]
    assert first == 1.0 and 0 < last < 1  # every block carries a segment at first, then a share of them
    assert (CONF / "experiment" / "recall_teacher.yaml").is_file()


def test_eval_grid_script_evaluates_the_teacher_trains_both_sweeps_and_reports_the_folder(tmp_path):
    calls = tmp_path / "calls.txt"
    fake_python = tmp_path / "python"
    fake_python.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\necho "pretraining..."\necho /cache/teachers/abc\n'
    )
    fake_python.chmod(0o755)
    for teacher_args, teacher_call in (
        (None, "-m dfw.demo --teacher-only teacher.experiment=recall_teacher"),  # the default
        ("", "-m dfw.demo --teacher-only"),  # the demo's teacher
        (
            "teacher.experiment=recall_teacher teacher.trainer.max_steps=9",
            "-m dfw.demo --teacher-only teacher.experiment=recall_teacher teacher.trainer.max_steps=9",
        ),
    ):
        calls.unlink(missing_ok=True)
        env = {**os.environ, "PY": str(fake_python), "OUT": str(tmp_path / "grid")}
        env.pop("TEACHER_ARGS", None)
        if teacher_args is not None:
            env["TEACHER_ARGS"] = teacher_args
        subprocess.run(
            [REPO / "sweeps" / "eval_grid.sh", "trainer.max_steps=3"],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        demo, teacher, grid, sizes, report = calls.read_text().splitlines()
        assert demo == teacher_call
        assert (
            teacher == "-m dfw.eval model=/cache/teachers/abc tasks=[ppl,copy,recall] "
            f"out_dir={tmp_path}/grid/teacher/eval progress=false"
        )
        for line, experiment in ((grid, "eval_grid"), (sizes, "eval_state_size")):
            assert line == (
                f"-m dfw.train -m experiment={experiment} model.pretrained=/cache/teachers/abc "
                f"model.tokenizer=/cache/teachers/abc hydra.sweep.dir={tmp_path}/grid/{experiment} "
                "trainer.max_steps=3"
            )
        assert report == f"-m dfw.report {tmp_path}/grid"
