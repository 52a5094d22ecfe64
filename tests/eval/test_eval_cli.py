"""`python -m dfw.eval` as a user runs it: on an export, a plain `save_pretrained` GPT-2 and a softmax export
(the same numbers for the same weights), results.csv with the model recorded, W&B offline, one `error:` line
and nothing written for bad input, the finished tasks kept when a run is interrupted, and dfw.train's
`eval.tasks=[...]` after training."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from omegaconf import OmegaConf

from dfw.data.tokenizers import gpt2_tokenizer
from dfw.errors import ConfigError
from dfw.eval import evaluate
from dfw.eval.recall import Recall
from dfw.model import build_model, export
from tests.conftest import CONF, run_module, save_tiny_gpt2, tiny_overrides
from tests.conftest import compose as compose_train

SMALL = [
    "data=tiny",
    "copy.lengths=[4,8]",
    "copy.samples=4",
    "recall.pairs=[2,4]",
    "recall.samples=4",
    "ppl.max_blocks=4",
    "progress=false",
    "wandb.mode=offline",
]


def eval_cfg(model: str | Path, out_dir: Path, *overrides: str):
    """conf/eval.yaml with overrides, as `python -m dfw.eval` composes it (served from the ConfigStore)."""
    import dfw.eval.__main__  # noqa: F401  (stores the configs)

    with initialize(config_path=None, version_base="1.3"):
        return compose(
            config_name="eval",
            overrides=[
                f"model={model}",
                f"out_dir={out_dir}",
                f"paths.cache_dir={out_dir.parent / 'cache'}",
                *SMALL,
                *overrides,
            ],
        )


def _rows(out_dir: Path) -> list[dict[str, str]]:
    with open(out_dir / "results.csv") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A plain save_pretrained GPT-2 (with a tokenizer), the same weights exported by dfw as softmax, and a
    DFW (decay) export."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = gpt2_tokenizer()
    plain = save_tiny_gpt2(root / "plain", vocab_size=50257, n_positions=64)
    tokenizer.save_pretrained(root / "plain")
    softmax = OmegaConf.load(CONF / "attention" / "softmax.yaml")
    export(plain, softmax, root / "softmax", tokenizer=tokenizer)
    torch.manual_seed(0)
    decay = OmegaConf.load(CONF / "attention" / "decay.yaml")
    config = OmegaConf.create(
        {"pretrained": None, "config": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}}
    )
    export(build_model(config, decay, tokenizer).eval(), decay, root / "decay", tokenizer=tokenizer)
    return {"plain": root / "plain", "softmax": root / "softmax", "decay": root / "decay"}


def test_a_plain_gpt2_and_its_softmax_export_give_the_same_numbers(models, tmp_path):
    plain = evaluate(eval_cfg(models["plain"], tmp_path / "plain"))
    softmax = evaluate(eval_cfg(models["softmax"], tmp_path / "softmax"))
    assert [(m.key, m.value) for m in plain if m.metric != "tokens_per_sec"] == [
        (m.key, m.value) for m in softmax if m.metric != "tokens_per_sec"
    ]
    rows = _rows(tmp_path / "softmax")
    assert {r["task"] for r in rows} == {"ppl", "copy", "recall"}
    assert {(r["model"], r["kind"], r["attention"], r["state_size"]) for r in rows} == {
        (str(models["softmax"]), "export", "softmax", "")
    }
    assert {r["kind"] for r in _rows(tmp_path / "plain")} == {"hf_dir"}
    assert list((tmp_path / "softmax" / "wandb").glob("offline-run-*")), (
        "W&B writes its offline run under out_dir"
    )
    assert (
        (tmp_path / "softmax" / "results.md")
        .read_text()
        .startswith(f"model: {models['softmax']} (export; attention=softmax")
    )


def test_a_converted_export_records_its_attention_and_state_size(models, tmp_path, capsys):
    results = evaluate(eval_cfg(models["decay"], tmp_path / "out", "tasks=[copy]", "wandb=null"))
    rows = _rows(tmp_path / "out")
    assert {(r["attention"], r["state_size"], r["kind"]) for r in rows} == {("decay", "16", "export")}
    assert int(rows[0]["state_bytes"]) == 2 * 2 * 16 * 16 * 4  # layers x heads x m x d float32
    assert [r["metric"] for r in rows].count("tokens_per_sec") == 1 and float(rows[-1]["value"]) > 0
    assert len(rows) == len(results) and not (tmp_path / "out" / "wandb").exists()
    out = capsys.readouterr().out
    assert "| copy | random, L=4 | acc " in out and "| copy |  | tokens/s " in out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tasks=[ppl,nope]"], "tasks: 'nope' is not a dfw.eval task"),
        (
            ["copy.lengths=[8,40]"],
            "copy.lengths: L=40 needs 2L = 80 tokens, more than the model's context of 64",
        ),
        (["recall.pairs=[0]"], "recall.pairs must be a non-empty list of positive integers, got [0]"),
        (
            ["tasks=[lm_eval]", "lm_eval.tasks=[no_such_lm_eval_task]", "lm_eval.include_defaults=false"],
            "lm_eval.tasks: lm-eval does not know no_such_lm_eval_task",
        ),
        (["data=text"], "data.files.train is not set"),
        (["batch_size=0"], "batch_size must be a positive integer, got 0"),
    ],
)
def test_bad_input_is_one_config_error_and_nothing_is_written(models, tmp_path, overrides, message):
    if "lm_eval" in overrides[0]:
        pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'dfw[lm_eval]')")
    with pytest.raises(ConfigError) as error:
        evaluate(eval_cfg(models["decay"], tmp_path / "out", *overrides))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_be_loaded_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no Hugging Face checkpoint there"):
        evaluate(eval_cfg(tmp_path / "nowhere", tmp_path / "out"))
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="broken.ckpt"):
        evaluate(eval_cfg(tmp_path / "broken.ckpt", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_without_lm_eval_installed_the_task_says_how_to_install_it(monkeypatch):
    from dfw.eval import build_tasks

    monkeypatch.setitem(
        __import__("sys").modules, "lm_eval.tasks", None
    )  # import lm_eval.tasks -> ImportError
    with pytest.raises(
        ConfigError,
        match=r"tasks=\[lm_eval\] needs lm-evaluation-harness, which is not installed: "
        r"pip install 'dfw\[lm_eval\]'",
    ):
        build_tasks(["lm_eval"], {"lm_eval": {"tasks": ["wikitext"]}}, 0)


def test_an_interrupted_run_keeps_the_tasks_already_finished(models, tmp_path, monkeypatch):
    def interrupted(self, model, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(Recall, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(eval_cfg(models["decay"], tmp_path / "out", "wandb=null"))
    assert {r["task"] for r in _rows(tmp_path / "out")} == {"ppl", "copy"}


@pytest.mark.slow
def test_the_command_line_prints_the_table_and_exits_2_on_bad_input(models, tmp_path):
    ok = run_module("dfw.eval", f"model={models['decay']}", f"out_dir={tmp_path / 'out'}", *SMALL)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.startswith(f"model: {models['decay']} (export; attention=decay, m=16")
    assert "| recall | pairs=4 | acc " in ok.stdout and "tokens/s" in ok.stdout
    assert {r["task"] for r in _rows(tmp_path / "out")} == {"ppl", "copy", "recall"}
    bad = run_module(
        "dfw.eval",
        f"model={models['decay']}",
        f"out_dir={tmp_path / 'bad'}",
        "tasks=[copy]",
        "copy.lengths=[100]",
    )
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.strip()]
    assert (
        errors[-1].startswith("error: copy.lengths: L=100 needs 2L = 200 tokens")
        and "Traceback" not in bad.stderr
    )
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_train_evaluates_after_training_when_asked_and_checks_its_options_first(tmp_path, text_files):
    from dfw.train import train

    overrides = tiny_overrides(
        tmp_path,
        text_files,
        "attention=decay",
        "eval.tasks=[ppl,copy]",
        "eval.copy.lengths=[4,8]",
        "eval.copy.samples=4",
        "eval.ppl.max_blocks=2",
    )
    bad = compose_train(
        *[o.replace("eval.copy.lengths=[4,8]", "eval.copy.lengths=[4,200]") for o in overrides]
    )
    with pytest.raises(
        ConfigError, match="copy.lengths: L=200 needs 2L = 400 tokens, more than the model's context of 256"
    ):
        train(bad)
    assert not (tmp_path / "run").exists(), "a bad eval option fails before training writes anything"
    metrics = train(compose_train(*overrides))
    rows = _rows(tmp_path / "run" / "eval")
    assert {r["task"] for r in rows} == {"ppl", "copy"} and {r["kind"] for r in rows} == {"trained run"}
    assert {r["attention"] for r in rows} == {"decay"}
    assert metrics["eval/copy/acc/random/mean over L"] == pytest.approx(
        next(float(r["value"]) for r in rows if r["headline"] == "True" and r["task"] == "copy")
    )
    with open(tmp_path / "run" / "csv" / "metrics.csv") as file:
        logged = list(csv.DictReader(file))
    assert any(row.get("eval/ppl/ppl/text validation") for row in logged), (
        "the run's loggers get the numbers too"
    )


@pytest.mark.slow
def test_a_training_checkpoint_is_evaluated_with_its_stored_attention(trained_run, tmp_path):
    evaluate(
        eval_cfg(
            trained_run.dir / "checkpoints" / "last.ckpt", tmp_path / "ckpt", "tasks=[copy]", "wandb=null"
        )
    )
    evaluate(eval_cfg(trained_run.dir / "model", tmp_path / "export", "tasks=[copy]", "wandb=null"))
    ckpt, exported = _rows(tmp_path / "ckpt"), _rows(tmp_path / "export")
    assert {(r["kind"], r["attention"], r["state_size"]) for r in ckpt} == {("checkpoint", "decay", "32")}
    assert [r["value"] for r in ckpt if r["metric"] != "tokens_per_sec"] == [
        r["value"] for r in exported if r["metric"] != "tokens_per_sec"
    ]  # the same final weights
