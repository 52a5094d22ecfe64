"""The embedded default (`python -m dfw.demo`) end to end, on a tiny budget."""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

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


def test_demo_pretrains_converts_finetunes_and_prints_the_table(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)  # the demo writes outputs/demo/<time>/ under the working directory
    # A seed of its own: the teacher is trained here, not found in the cache from an earlier run.
    seed = f"teacher.seed={time.time_ns() % 10**9}"
    teacher = [f"teacher.{o}" for o in TINY] + [seed, "teacher.model.config.n_layer=1", "teacher.model.config.n_embd=64"]
    assert demo.main([*teacher, *TINY]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| ([\w ,-]+) \| ([\d.]+) \| ([\d.]+)% \|$", out, re.M)
    assert [name for name, _, _ in rows] == [
        "softmax teacher, as pretrained", "softmax, fine-tuned", "DFW, right after conversion",
        "DFW, after attention transfer", "DFW, fine-tuned",
    ]  # fmt: skip
    reference = float(rows[1][1])  # softmax with the same fine-tuning budget as DFW
    for _, ppl, share in rows:
        assert abs(float(share) - 100 * reference / float(ppl)) < 0.1
    results = list(tmp_path.glob("outputs/demo/*/results.md"))
    assert len(results) == 1 and "DFW, fine-tuned" in results[0].read_text()

    # A second run reuses the cached teacher instead of pretraining it again.
    caplog.set_level(logging.INFO, logger="dfw.demo")
    capsys.readouterr()
    assert demo.main([*teacher, "--teacher-only"]) == 0
    assert "reusing the softmax teacher" in caplog.text
    teacher_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (teacher_dir / "dfw_attention.yaml").is_file() and (teacher_dir / "tokenizer.json").is_file()
    shutil.rmtree(teacher_dir)
