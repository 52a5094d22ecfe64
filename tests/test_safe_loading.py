"""Nothing executed: checkpoints load as data only, stored configs name only dfw's own classes and options;
exports identify themselves (model_type dfw-gpt2) and bad files give one ConfigError."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from dfw.attention import AttentionCore, FastWeightAttention
from dfw.data.tokenizers import gpt2_tokenizer
from dfw.errors import ConfigError
from dfw.generate import load_for_generation
from dfw.hf import MODEL_TYPE, DFWForCausalLM
from dfw.model import ATTENTION_FILE, build_model, export, load_exported
from dfw.safe_config import UnsafeConfigError, checked_node
from dfw.train import train
from tests.conftest import compose, tiny_overrides


class _Payload:
    """Unpickling this creates `marker` (what a malicious checkpoint would do with any callable)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious_target(marker: Path) -> dict:
    return {"_target_": "builtins.open", "_args_": [str(marker), "w"], "name": "decay"}


def _assert_same_weights(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    a, b = actual.state_dict(), expected.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def converted(tokenizer):
    """A tiny GPT-2 converted to decay attention (random weights) and its attention node."""
    cfg = compose("model=tiny", "attention=decay", "paths.output_dir=/tmp/unused")
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.attention, tokenizer).eval()
    return net, OmegaConf.to_container(cfg.attention, resolve=True)


@pytest.fixture
def exported(tmp_path, converted, tokenizer) -> Path:
    net, attention = converted
    return export(net, attention, tmp_path / "export", tokenizer=tokenizer, weights="final", step=7)


# -- pickled payloads ------------------------------------------------------------------------------
def test_a_pickled_payload_in_a_checkpoint_is_refused_not_run(tmp_path, text_files):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, evil)
    with pytest.raises(ConfigError, match="pickled Python objects"):
        load_for_generation(str(evil))
    cfg = compose(*tiny_overrides(tmp_path, text_files, "attention=decay", f"ckpt_path={evil}"))
    with pytest.raises(ConfigError, match="ckpt_path=.*pickled Python objects"):
        train(cfg)
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("content", [b"not a checkpoint\n", "truncated"])
def test_a_truncated_or_foreign_checkpoint_is_one_error(tmp_path, text_files, content):
    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        torch.save({"state_dict": {"w": torch.randn(1000)}, "global_step": 1}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="cannot be loaded as a checkpoint"):
        load_for_generation(str(path))
    with pytest.raises(ConfigError, match="ckpt_path=.*cannot be loaded as a checkpoint"):
        train(compose(*tiny_overrides(tmp_path, text_files, f"ckpt_path={path}")))
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- _target_ in stored configs ------------------------------------------------------------------
def test_a_target_in_an_export_is_refused_not_run(tmp_path, exported, tokenizer):
    marker = tmp_path / "pwned"
    config_file = exported / "config.json"
    config = json.loads(config_file.read_text())
    config["attention"] = _malicious_target(marker)
    config_file.write_text(json.dumps(config))
    with pytest.raises(UnsafeConfigError, match=r"attention\._target_='builtins.open' refused"):
        load_exported(exported)
    with pytest.raises(UnsafeConfigError, match="refused"):
        AutoModelForCausalLM.from_pretrained(exported)
    cfg = compose(
        "model=tiny", "attention=decay", f"model.pretrained={exported}", "paths.output_dir=/tmp/unused"
    )
    with pytest.raises(UnsafeConfigError, match="refused"):
        build_model(cfg.model, cfg.attention, tokenizer)
    assert not marker.exists()


def test_a_target_in_an_old_style_export_is_refused_not_run(tmp_path, converted, tokenizer):
    """Exports of earlier versions: model_type gpt2 plus dfw_attention.yaml."""
    marker = tmp_path / "pwned"
    net, _ = converted
    old = tmp_path / "old"
    GPT2LMHeadModel.save_pretrained(net, old)  # a GPT-2 config.json
    (old / ATTENTION_FILE).write_text(yaml.safe_dump(_malicious_target(marker)))
    with pytest.raises(
        UnsafeConfigError, match=f"{ATTENTION_FILE}: attention._target_='builtins.open' refused"
    ):
        load_exported(old)
    assert not marker.exists()


@pytest.mark.parametrize("node", ["attention", "data"])
def test_a_target_in_a_checkpoints_config_is_refused_not_run(tmp_path, converted, node):
    marker = tmp_path / "pwned"
    net, attention = converted
    config = {
        "attention": attention,
        "model": {"tokenizer": "bpe-300" if node == "data" else "gpt2"},
        "data": {
            "_target_": "dfw.data.LanguageModelingDataModule",
            "corpus": "text",
            "tokenizer": "bpe-300",
            "block_size": 32,
            "batch_size": 2,
        },
    }
    config[node] = _malicious_target(marker)
    path = tmp_path / "crafted.ckpt"
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "model_config": net.config.to_dict(),
            "hyper_parameters": {"config": config},
        },
        path,
    )
    with pytest.raises(
        UnsafeConfigError, match=rf"stored run config\): {node}\._target_='builtins.open' refused"
    ):
        load_for_generation(str(path))
    assert not marker.exists()


def test_the_allow_list_is_dfws_own_classes_and_their_options():
    ok = {"_target_": "dfw.attention.FastWeightAttention", "_partial_": True, "name": "x", "state_size": 32}
    cls, options = checked_node(ok, AttentionCore, "f.yaml", "attention")
    assert cls is FastWeightAttention and options == {"state_size": 32}
    # Every argument of the class passes, without a list of keys to maintain.
    every = {
        name: None
        for name, p in inspect.signature(FastWeightAttention).parameters.items()
        if p.kind != p.VAR_KEYWORD
    }
    checked_node({**ok, **every}, AttentionCore, "f.yaml", "attention")
    refused = {
        "os.system": {**ok, "_target_": "os.system"},
        "not an attention core": {**ok, "_target_": "dfw.checkpointing.AtomicCheckpointIO"},
        "a dfw function": {**ok, "_target_": "dfw.model.export"},
        "_args_": {**ok, "_args_": ["x"]},
        "_recursive_": {**ok, "_recursive_": True},
        "nested": {**ok, "feature_map": {"_target_": "builtins.eval", "_args_": ["1"]}},
        "interpolation": {**ok, "feature_map": "${oc.env:HOME}"},
    }
    for what, node in refused.items():
        with pytest.raises(ConfigError, match="^f.yaml: attention"):
            checked_node(node, AttentionCore, "f.yaml", "attention")
            pytest.fail(what)


def test_a_stored_target_is_checked_by_name_before_anything_is_imported():
    """A module named by a stored config is never imported to find out what it holds: importing
    dfw.report.__main__ would run dfw's report tool (and exit) inside whoever loads the model."""
    code = (
        "import sys\n"
        "from dfw.attention import AttentionCore\n"
        "from dfw.safe_config import UnsafeConfigError, checked_node\n"
        "for target in ('dfw.report.__main__.X', 'dfw.bench.__main__.Y', 'dfw.demo.Z'):\n"
        "    try:\n"
        "        checked_node({'_target_': target}, AttentionCore, 'f.yaml', 'attention')\n"
        "    except UnsafeConfigError as err:\n"
        "        print('refused', err)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('dfw.report', 'dfw.bench', 'dfw.demo'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len([line for line in lines if line.startswith("refused f.yaml: attention._target_=")]) == 3, lines
    assert lines[-1] == "[]"


def test_an_unknown_attention_option_is_one_error_naming_it(tmp_path, text_files):
    cfg = compose(*tiny_overrides(tmp_path, text_files, "attention=decay", "+attention.stat_size=3"))
    # FastWeightAttention refuses it itself (its update rules take options of their own); a class without
    # **options is checked against its signature (dfw.safe_config.check_options).
    with pytest.raises(ConfigError, match="stat_size"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a usable GPU")
def test_kernel_cuda_without_a_gpu_fails_when_the_model_is_built(tmp_path, text_files):
    cfg = compose(*tiny_overrides(tmp_path, text_files, "attention=decay", "attention.kernel=cuda"))
    with pytest.raises(ConfigError, match="attention.kernel=cuda cannot run here"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_truncated_pretrained_model_is_one_error(tmp_path, tokenizer):
    directory = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(tokenizer))).save_pretrained(
        directory
    )
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = compose(
        "model=tiny", "attention=decay", f"model.pretrained={directory}", "paths.output_dir=/tmp/unused"
    )
    with pytest.raises(ConfigError, match="cannot be read, the file may be truncated"):
        build_model(cfg.model, cfg.attention, tokenizer)


# -- exports identify themselves -----------------------------------------------------------------
def test_an_export_loads_as_its_own_model_type_through_the_auto_classes(exported, converted):
    net, _ = converted
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and config["attention"]["name"] == "decay"
    assert (config["exported_weights"], config["exported_step"]) == ("final", 7)
    assert not (exported / ATTENTION_FILE).exists()
    auto = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert isinstance(auto, DFWForCausalLM)
    assert isinstance(auto.transformer.h[0].attn.core, FastWeightAttention)
    ids = torch.randint(0, net.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, net(ids).logits, rtol=0, atol=0)
    _assert_same_weights(load_exported(exported), net)


def test_without_dfw_transformers_refuses_an_export_naming_its_model_type(exported):
    code = (
        "from transformers import AutoModelForCausalLM; "
        f"AutoModelForCausalLM.from_pretrained({str(exported)!r})"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode != 0
    assert f"model type `{MODEL_TYPE}`" in result.stderr


def test_an_old_style_export_still_loads(tmp_path, converted, tokenizer):
    net, attention = converted
    old = tmp_path / "old"
    GPT2LMHeadModel.save_pretrained(net, old)  # what earlier versions wrote: model_type gpt2 ...
    OmegaConf.save(OmegaConf.create(attention), old / ATTENTION_FILE)  # ... plus the attention config
    tokenizer.save_pretrained(old)
    assert json.loads((old / "config.json").read_text())["model_type"] == "gpt2"
    for rebuilt in (load_exported(old), load_for_generation(str(old))[0]):
        assert isinstance(rebuilt.transformer.h[0].attn.core, FastWeightAttention)
        _assert_same_weights(rebuilt, net)
    cfg = compose("model=tiny", "attention=decay", f"model.pretrained={old}", "paths.output_dir=/tmp/unused")
    assert isinstance(
        build_model(cfg.model, cfg.attention, tokenizer).transformer.h[1].attn.core, FastWeightAttention
    )


def test_a_model_converted_from_an_export_is_exported_with_its_own_metadata(tmp_path, converted, tokenizer):
    """A softmax export (the demo's teacher) carries exported_* fields; its converted child gets new ones."""
    net, attention = converted
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(tokenizer)))
    export(
        teacher,
        {"name": "softmax", "_target_": "dfw.attention.SoftmaxAttention", "_partial_": True},
        tmp_path / "t",
        step=3,
    )
    cfg = compose(
        "model=tiny", "attention=decay", f"model.pretrained={tmp_path / 't'}", "paths.output_dir=/tmp/unused"
    )
    child = build_model(cfg.model, cfg.attention, tokenizer)
    export(child, attention, tmp_path / "c", weights="best", step=5)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (config["model_type"], config["exported_weights"], config["exported_step"]) == (
        MODEL_TYPE,
        "best",
        5,
    )


def test_an_option_a_class_does_not_take_is_refused_by_its_signature():
    from dfw.safe_config import check_options

    class Core:
        def __init__(self, hidden_size: int, state_size: int = 8): ...

    with pytest.raises(ConfigError, match="attention.stat_size is not an option of Core"):
        check_options(Core, {"_target_": "x", "name": "n", "stat_size": 3}, "attention")
    check_options(Core, {"_target_": "x", "name": "n", "state_size": 3}, "attention")
