"""lm-evaluation-harness on dfw's models, offline, with the local tasks of tests/eval/lm_eval_tasks/ (a
loglikelihood-rolling task and a generate-until task whose datasets are JSON files): through dfw.eval's
`lm_eval` task, through lm-eval's Python API with `DFWLM`, and through lm-eval's command line with
`--model dfw` (`python -m dfw.eval.lm_eval_cli`)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from dfw.data.tokenizers import gpt2_tokenizer
from dfw.eval import evaluate
from dfw.model import build_model, export
from tests.conftest import CONF, REPO, run_module
from tests.eval.test_eval_cli import eval_cfg

pytest.importorskip(
    "lm_eval", reason="lm-eval is an optional extra (pip install 'dfw[lm_eval]'; `make install` has it)"
)

TASKS = REPO / "tests" / "eval" / "lm_eval_tasks"
LOCAL = [
    "tasks=[lm_eval]",
    f"lm_eval.include_path={TASKS}",
    "lm_eval.include_defaults=false",
    "lm_eval.bootstrap_iters=0",
]


def _lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A DFW (decay) model exported by dfw, and the model itself."""
    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer()
    decay = OmegaConf.load(CONF / "attention" / "decay.yaml")
    config = OmegaConf.create(
        {"pretrained": None, "config": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}}
    )
    net = build_model(config, decay, tokenizer).eval()
    directory = export(net, decay, tmp_path_factory.mktemp("export") / "decay", tokenizer=tokenizer)
    return directory, net


def _word_perplexity(net) -> float:
    """exp(-sum of log p(document) / words), each document scored after the EOS token, as lm-eval's rolling
    windows do for documents shorter than the context."""
    tokenizer = gpt2_tokenizer()
    total, words = 0.0, 0
    for doc in _lines("documents.jsonl"):
        ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer(doc["text"]).input_ids]])
        with torch.no_grad():
            logprobs = torch.log_softmax(net(ids).logits[0, :-1].double(), dim=-1)  # (T-1, V)
        total += float(logprobs.gather(1, ids[0, 1:, None]).sum())
        words += len(re.split(r"\s+", doc["text"]))
    return math.exp(-total / words)


def _greedy(net, prompt: str, new_tokens: int) -> str:
    tokenizer = gpt2_tokenizer()
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        for _ in range(new_tokens):  # recomputation: the whole sequence, no cache
            ids = torch.cat([ids, net(ids).logits[:, -1:].argmax(-1)], dim=1)
    return tokenizer.decode(ids[0, -new_tokens:]).split("\n")[0]


def test_dfw_eval_runs_local_lm_eval_tasks_and_the_rolling_loglikelihood_is_the_models(
    converted, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)  # the task YAMLs name their data files relative to the repository root
    directory, net = converted
    results = evaluate(
        eval_cfg(directory, tmp_path / "out", *LOCAL, "lm_eval.tasks=[dfw_test_rolling,dfw_test_generate]")
    )
    found = {(m.variant, m.metric): m for m in results}
    assert found[("dfw_test_rolling", "word_perplexity")].value == pytest.approx(
        _word_perplexity(net), rel=1e-5
    )
    assert (
        found[("dfw_test_rolling", "word_perplexity")].headline
        and found[("dfw_test_generate", "exact_match")].headline
    )
    assert 0.0 <= found[("dfw_test_generate", "exact_match")].value <= 1.0


def test_generate_until_through_lm_evals_api_answers_with_the_models_greedy_continuations(
    converted, monkeypatch
):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dfw.eval.lm_eval_model import DFWLM

    monkeypatch.chdir(REPO)
    _, net = converted
    lm = DFWLM(
        net, tokenizer=gpt2_tokenizer(), batch_size=2
    )  # two prompts of different lengths: left padding
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=["dfw_test_generate"],
        bootstrap_iters=0,
        log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
    )
    samples = sorted(output["samples"]["dfw_test_generate"], key=lambda s: s["doc_id"])
    for sample, doc in zip(samples, _lines("questions.jsonl"), strict=True):
        prompt = f"Question: {doc['question']}\nAnswer:"
        assert sample["resps"][0][0] == _greedy(net, prompt, 6)


@pytest.mark.slow
def test_lm_evals_command_line_loads_an_export_with_model_dfw(converted, tmp_path):
    directory, net = converted
    result = run_module(
        "dfw.eval.lm_eval_cli",
        "--model",
        "dfw",
        "--model_args",
        f"pretrained={directory}",
        "--tasks",
        "dfw_test_rolling",
        "--include_path",
        str(TASKS),
        "--batch_size",
        "2",
        "--output_path",
        str(tmp_path / "lm_eval"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = tmp_path.glob("lm_eval/**/results_*.json")
    value = json.loads(written.read_text())["results"]["dfw_test_rolling"]["word_perplexity,none"]
    assert value == pytest.approx(_word_perplexity(net), rel=1e-5)
    missing = run_module(
        "dfw.eval.lm_eval_cli",
        "--model",
        "dfw",
        "--model_args",
        f"pretrained={tmp_path / 'nowhere'}",
        "--tasks",
        "dfw_test_rolling",
        "--include_path",
        str(TASKS),
    )
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: model=")
