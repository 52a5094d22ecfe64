"""`python -m dfw.generate`: loads an exported directory, a training checkpoint and a Hugging Face directory.

The checkpoint and the exported directory come from one real (tiny, 4-step) `dfw.train` run (the session's
`trained_run`), so they must give the same greedy text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from omegaconf import OmegaConf

from dfw.data.tokenizers import gpt2_tokenizer
from dfw.errors import ConfigError
from dfw.generate import generate, load_for_generation
from dfw.model import build_model, export
from tests.conftest import REPO, run_module

PROMPT = "The quick brown fox"


def generate_cfg(model: str | Path, *overrides: str):
    """conf/generate.yaml with overrides, as `python -m dfw.generate` composes it (ConfigStore-served)."""
    import dfw.generate  # noqa: F401  (stores the config)

    with initialize(config_path=None, version_base="1.3"):
        return compose(config_name="generate", overrides=[f"model={model}", f"prompt={PROMPT}", *overrides])


@pytest.mark.slow
def test_checkpoint_and_export_of_one_run_generate_the_same_text(trained_run, capsys):
    checkpoint, exported = trained_run.dir / "checkpoints" / "last.ckpt", trained_run.dir / "model"
    assert (
        checkpoint.is_file()
        and json.loads((exported / "config.json").read_text())["model_type"] == "dfw-gpt2"
    )
    from_checkpoint = generate(generate_cfg(checkpoint, "temperature=0", "max_new_tokens=8", "device=cpu"))
    from_export = generate(generate_cfg(exported, "temperature=0", "max_new_tokens=8", "device=cpu"))
    assert from_checkpoint["texts"] == from_export["texts"]
    assert from_checkpoint["texts"][0].startswith(PROMPT) and from_checkpoint["new_tokens"] == 8
    assert from_checkpoint["cache"] == "recurrent state" and from_checkpoint["cache_bytes"] > 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MiB after" in out and "decode step: eager" in out
    # Weights as trained: the checkpoint's net equals the exported model.
    net_ckpt, _ = load_for_generation(str(checkpoint))
    net_export, _ = load_for_generation(str(exported))
    exported_weights = net_export.state_dict()
    for name, weight in net_ckpt.state_dict().items():
        assert torch.equal(weight, exported_weights[name]), name


@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory) -> tuple[Path, object]:
    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer()
    attention = OmegaConf.load(REPO / "conf" / "attention" / "decay.yaml")
    model = OmegaConf.create(
        {"pretrained": None, "config": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 96}}
    )
    net = build_model(model, attention, tokenizer).eval()
    directory = export(net, attention, tmp_path_factory.mktemp("export") / "model", tokenizer=tokenizer)
    return directory, net


def test_greedy_text_is_the_models_own_greedy_continuation(exported_tiny):
    directory, net = exported_tiny
    result = generate(generate_cfg(directory, "temperature=0", "max_new_tokens=12", "device=cpu"))
    ids = gpt2_tokenizer()(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = net.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=50256)
    assert result["texts"][0] == gpt2_tokenizer().decode(expected[0], skip_special_tokens=True)


def test_sampling_is_reproducible_from_the_seed_and_a_batch_is_left_padded(exported_tiny):
    directory, _ = exported_tiny
    prompts = "prompt=[Hi,'A much longer prompt than the first one']"
    runs = [
        generate(
            generate_cfg(
                directory,
                prompts,
                "temperature=0.8",
                "top_k=20",
                "top_p=0.9",
                f"seed={s}",
                "max_new_tokens=6",
            )
        )
        for s in (1, 1, 2)
    ]
    assert runs[0]["texts"] == runs[1]["texts"] and runs[0]["texts"] != runs[2]["texts"]
    assert runs[0]["texts"][0].startswith("Hi") and runs[0]["texts"][1].startswith("A much longer")


def test_a_softmax_hugging_face_directory_uses_the_kv_cache(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64)).save_pretrained(tmp_path)
    result = generate(generate_cfg(tmp_path, "temperature=0", "max_new_tokens=5", "device=cpu"))
    per_token = 2 * 1 * 16 * 4  # keys and values, 1 layer, width 16, float32
    assert result["cache"] == "KV cache" and result["cache_bytes"] == per_token * (
        len(gpt2_tokenizer()(PROMPT).input_ids) + 4
    )


@pytest.mark.slow
def test_a_model_that_is_not_there_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint"):
        load_for_generation(str(tmp_path / "missing.ckpt"))
    with pytest.raises(ConfigError, match="config.json missing"):
        load_for_generation(str(tmp_path))
    done = run_module("dfw.generate", f"model={tmp_path / 'missing.ckpt'}", timeout=120)
    assert done.returncode == 2 and "no such checkpoint" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prompt=''", "prompt is empty"),
        ("prompt=[Hi,'']", r"prompt\[1\] is empty"),
        ("max_new_tokens=0", "max_new_tokens must be a positive integer, got 0"),
        ("max_new_tokens=-3", "max_new_tokens must be a positive integer, got -3"),
        ("temperature=-1", "temperature must be 0 .greedy. or positive, got -1"),
        ("top_k=-1", "top_k must be a non-negative integer .0: no top-k filtering., got -1"),
        ("top_p=0", r"top_p must be in \(0, 1\] .1: no nucleus filtering., got 0"),
        ("top_p=2", r"top_p must be in \(0, 1\] .1: no nucleus filtering., got 2"),
        ("top_p=-0.5", r"top_p must be in \(0, 1\]"),
        ("+temprature=0.5", "temprature is not an option of dfw.generate; its options are .*temperature"),
        ("seed=x", "seed must be an integer, got 'x'"),
        ("cuda_graph=maybe", "cuda_graph must be true or false, got 'maybe'"),
    ],
)
def test_bad_generation_options_are_one_error_before_loading(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        generate(generate_cfg(tmp_path / "never-loaded", override))


def test_a_prompt_longer_than_the_context_says_to_shorten_it(exported_tiny):
    directory, _ = exported_tiny
    with pytest.raises(
        ConfigError,
        match=r"the prompt is \d+ tokens, which leaves none of the model's 96 learned positions for new "
        r"tokens; shorten it",
    ):
        generate(generate_cfg(directory, "prompt='" + "word " * 200 + "'", "max_new_tokens=1", "device=cpu"))
