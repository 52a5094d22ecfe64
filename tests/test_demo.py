"""`python -m dfw.demo` end to end on a tiny budget: pretrain the teacher, cache it, fine-tune it as softmax
and as DFW, print the table; a second run reuses the cached teacher.

Hermetic: the cache (teacher, tokenizer, tokens) is a temporary directory ($DFW_CACHE), the corpus is the
session's text files instead of the Shakespeare download (tests/data covers that corpus), and the seed is the
config's, so every run trains the same teacher."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from omegaconf import open_dict

from dfw import demo

TINY = [
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "data.batch_size=4",
    "data.block_size=64",
]
ROW = re.compile(r"^\| ([\w ,-]+) \| ([\d.]+) \| ([\d.]+)% \|$", re.M)


@pytest.mark.slow
def test_demo_pretrains_converts_finetunes_and_prints_the_table(
    tmp_path, text_files, monkeypatch, capsys, caplog
):
    monkeypatch.chdir(tmp_path)  # the demo writes outputs/demo/<time>/ under the working directory
    monkeypatch.setenv("DFW_CACHE", str(tmp_path / "cache"))
    corpus = ["data=text", *(f"data.files.{split}={path}" for split, path in text_files.items())]
    student = [*TINY, *corpus]
    teacher = [f"teacher.{o}" for o in student] + [
        "teacher.model.config.n_layer=1",
        "teacher.model.config.n_embd=64",
    ]
    assert demo.main([*teacher, *student]) == 0
    out = capsys.readouterr().out
    rows = ROW.findall(out)
    assert [name for name, _, _ in rows] == [
        "softmax teacher, as pretrained",
        "softmax, fine-tuned",
        "DFW, right after conversion",
        "DFW, after attention transfer",
        "DFW, fine-tuned",
        "DFW with a 16-token window, fine-tuned",
    ]
    reference = float(rows[1][1])  # softmax with the same fine-tuning budget as DFW
    for _, ppl, share in rows:
        assert abs(float(share) - 100 * reference / float(ppl)) < 0.1
    results = list(tmp_path.glob("outputs/demo/*/results.md"))
    assert len(results) == 1 and ROW.findall(results[0].read_text()) == rows  # the printed table, saved

    # A second run reuses the cached teacher instead of pretraining it again.
    caplog.set_level(logging.INFO, logger="dfw.demo")
    assert demo.main([*teacher, "--teacher-only"]) == 0
    assert "reusing the softmax teacher" in caplog.text
    teacher_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert teacher_dir.parent == tmp_path / "cache" / "teachers"
    assert (teacher_dir / "dfw_attention.yaml").is_file() and (teacher_dir / "tokenizer.json").is_file()


def test_a_teacher_trained_the_old_way_is_not_reused(monkeypatch, tmp_path):
    """The teacher cache key holds TEACHER_VERSION, raised when dfw changes how it trains a softmax teacher
    beyond its config (2: GPT-2's own attention, with its attention dropout): a new version, a new key."""
    cfg = demo._compose(["experiment=demo_teacher", f"paths.output_dir={tmp_path / 'teacher'}"])
    key = demo._teacher_key(cfg)
    assert demo._teacher_key(cfg) == key  # a function of the config
    monkeypatch.setattr(demo, "TEACHER_VERSION", demo.TEACHER_VERSION + 1)
    assert demo._teacher_key(cfg) != key


def test_an_option_left_at_null_keeps_the_teachers_key(tmp_path):
    """softmax's `window: null` (issue 19) trains the teacher as before it existed: a teacher cached then is
    reused; an option set to a value makes a new key."""
    cfg = demo._compose(["experiment=demo_teacher", f"paths.output_dir={tmp_path / 'teacher'}"])
    assert cfg.attention.window is None
    key = demo._teacher_key(cfg)
    with open_dict(cfg):
        del cfg.attention["window"]
        assert demo._teacher_key(cfg) == key
        cfg.attention.window = 8
        assert demo._teacher_key(cfg) != key


def test_help_prints_the_usage_and_an_unknown_flag_is_refused_before_anything_runs(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.chdir(tmp_path)  # the demo writes outputs/demo/... under the working directory
    assert demo.main(["--help"]) == 0
    assert "--teacher-only" in capsys.readouterr().out
    assert demo.main(["--teacher_only"]) == 2
    assert "error: dfw.demo has no option --teacher_only" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()
