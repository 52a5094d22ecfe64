"""Pinned numbers and names that users' files depend on: checked against `tests/pinned/*.json`.

What is pinned (and why it must not move when code is reorganised):
- `state_dict_keys.json`: every key, shape and dtype of the state dict of a tiny GPT-2 converted with each
  attention preset (checkpoints and exports load by these keys);
- `exports.json`: the files an export holds and the fields of its config.json, for a converted (dfw-gpt2)
  and a softmax (plain gpt2) model;
- `logits.json`: logits of a tiny model converted with a few presets (new parameters moved off their
  initialisation, a fixed input), directly and after export + reload through every loader;
- `configs.json`: the composed train config (as written, interpolations unresolved) with the defaults, and
  what each option of each config group changes in it; `debug=fast` resolved; the composed generate config.

A deliberate change of one of these is a change of dfw's behaviour: regenerate the file with
`DFW_WRITE_PINNED=1 python -m pytest tests/test_pinned.py` and say why in the commit and in CHANGELOG.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from tests.conftest import CONF, VocabTokenizer, compose, save_tiny_gpt2

PINNED = Path(__file__).resolve().parent / "pinned"
WRITE = os.environ.get("DFW_WRITE_PINNED") == "1"
PRESETS = sorted(path.stem for path in (CONF / "attention").glob("*.yaml"))
# A linear map with gates, learned maps, random features, and softmax.
LOGIT_PRESETS = ("decay", "hedgehog", "performer", "softmax")
# Logits are float32 on CPU; summation order may differ with the thread count, nothing else may.
LOGIT_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def check_pinned(name: str, actual: Any) -> Any:
    """Compare `actual` (plain JSON data) with tests/pinned/<name>.json; with DFW_WRITE_PINNED=1, write it."""
    path = PINNED / f"{name}.json"
    if WRITE:
        PINNED.mkdir(exist_ok=True)
        path.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
    assert path.is_file(), f"{path} missing: run DFW_WRITE_PINNED=1 python -m pytest {__file__}"
    return json.loads(path.read_text())


def _model_cfg(path: Path):
    return OmegaConf.create({"name": "tiny", "pretrained": str(path), "tokenizer": "gpt2", "config": None})


def converted_tiny(tmp_path: Path, preset: str, moved: bool = True):
    """The tiny GPT-2 of tests/conftest.py (seed 0) converted with `preset`; with `moved`, every parameter
    shifted by a seeded draw, so the logits depend on the new parameters too."""
    from dfw.model import build_model

    hf = tmp_path / "hf"
    if not (hf / "config.json").is_file():
        save_tiny_gpt2(hf)
    attention = OmegaConf.load(CONF / "attention" / f"{preset}.yaml")
    torch.manual_seed(0)  # T2R's map is drawn from the global generator
    net = build_model(_model_cfg(hf), attention, VocabTokenizer()).eval()
    if moved:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in sorted(net.named_parameters()):
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return net, attention


def fixed_input() -> torch.Tensor:
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))  # (B, T)


def logits_of(net) -> torch.Tensor:
    with torch.no_grad():
        return net(fixed_input(), use_cache=False).logits[:, ::4, :8].float()  # (B, T/4, 8)


def test_state_dict_keys_of_every_preset(tmp_path):
    actual = {}
    for preset in PRESETS:
        net, _ = converted_tiny(tmp_path, preset, moved=False)
        actual[preset] = {key: [list(t.shape), str(t.dtype)] for key, t in net.state_dict().items()}
    assert actual == check_pinned("state_dict_keys", actual)


# What dfw decides in an export (the rest of config.json and the tokenizer's files are transformers').
DFW_FILES = ("config.json", "model.safetensors", "dfw_attention.yaml", "tokenizer.json")
DFW_FIELDS = (
    "model_type",
    "architectures",
    "attention",
    "exported_weights",
    "exported_step",
    "n_layer",
    "n_head",
    "n_embd",
    "n_inner",
    "n_positions",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
)


def _export_description(directory: Path) -> dict[str, Any]:
    config = json.loads((directory / "config.json").read_text())
    return {
        "files": [name for name in DFW_FILES if (directory / name).is_file()],
        "config.json": {key: config.get(key, "<absent>") for key in DFW_FIELDS},
    }


def test_export_files_and_config_fields(tmp_path):
    from dfw.data.tokenizers import gpt2_tokenizer
    from dfw.model import export

    actual = {}
    for preset in ("decay", "softmax"):
        net, attention = converted_tiny(tmp_path, preset)
        directory = export(net, attention, tmp_path / f"export-{preset}", tokenizer=gpt2_tokenizer(), step=3)
        actual[preset] = _export_description(directory)
        if preset == "softmax":
            actual[preset]["dfw_attention.yaml"] = OmegaConf.to_container(
                OmegaConf.load(directory / "dfw_attention.yaml")
            )
    assert actual == check_pinned("exports", actual)


def test_logits_of_converted_models_directly_and_through_every_loader(tmp_path):
    from dfw.data.tokenizers import gpt2_tokenizer
    from dfw.generate import load_for_generation
    from dfw.model import build_model, export, load_exported

    actual = {}
    for preset in LOGIT_PRESETS:
        net, attention = converted_tiny(tmp_path, preset)
        actual[preset] = logits_of(net).tolist()
        directory = export(net, attention, tmp_path / f"export-{preset}", tokenizer=gpt2_tokenizer())
        loaded = {
            "load_for_generation": load_for_generation(str(directory))[0],
            "build_model(model.pretrained=<export>)": build_model(
                _model_cfg(directory), attention, VocabTokenizer()
            ),
            "load_exported": load_exported(directory),
        }
        for how, reloaded in loaded.items():
            torch.testing.assert_close(logits_of(reloaded.eval()), logits_of(net), rtol=0, atol=0, msg=how)
    pinned = check_pinned("logits", actual)
    assert sorted(pinned) == sorted(actual)
    for preset in LOGIT_PRESETS:
        torch.testing.assert_close(
            torch.tensor(actual[preset]), torch.tensor(pinned[preset]), **LOGIT_TOLERANCE
        )


def test_an_old_format_export_gives_the_pinned_logits(tmp_path):
    """Exports written before dfw-gpt2 (model_type gpt2 + dfw_attention.yaml) still load, to the same
    model."""
    from transformers import GPT2LMHeadModel

    from dfw.generate import load_for_generation
    from dfw.model import load_exported

    net, attention = converted_tiny(tmp_path, "decay")
    old = tmp_path / "old"
    GPT2LMHeadModel.save_pretrained(net, old)
    OmegaConf.save(attention, old / "dfw_attention.yaml")
    pinned = torch.tensor(json.loads((PINNED / "logits.json").read_text())["decay"])
    for reloaded in (load_exported(old), load_for_generation(str(old))[0]):
        torch.testing.assert_close(logits_of(reloaded.eval()), pinned, **LOGIT_TOLERANCE)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        items = {}
        for key, value in node.items():
            items.update(_flat(value, f"{prefix}{key}."))
        return items or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def _composed(*overrides: str) -> dict[str, Any]:
    return _flat(OmegaConf.to_container(compose(*overrides), resolve=False))


def group_options() -> list[str]:
    """`group=option` for every option of every config group of conf/ (hydra's own group aside)."""
    options = []
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        options += [f"{group.name}={path.stem}" for path in sorted(group.glob("*.yaml"))]
    return options


def test_composed_configs():
    default = _composed()
    actual: dict[str, Any] = {"train": default, "train with": {}}
    for option in group_options():
        composed = _composed(option)
        changed = {key: value for key, value in composed.items() if default.get(key, "<absent>") != value}
        removed = sorted(set(default) - set(composed))
        actual["train with"][option] = {"changed": changed, "removed": removed}

    # Resolved too, where nothing depends on the machine (a CPU trainer, paths given).
    paths = ("paths.output_dir=/run", "paths.cache_dir=/cache")
    actual["train debug=fast, resolved"] = _flat(
        OmegaConf.to_container(compose("debug=fast", *paths), resolve=True)
    )

    from hydra import compose as hydra_compose
    from hydra import initialize

    import dfw.generate  # noqa: F401  (stores the generate config)

    with initialize(config_path=None, version_base="1.3"):
        actual["generate"] = _flat(
            OmegaConf.to_container(hydra_compose(config_name="generate", overrides=["model=x"]))
        )
    assert actual == check_pinned("configs", actual)
