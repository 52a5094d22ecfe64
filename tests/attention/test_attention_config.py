"""Bad attention configs fail when the model is built, with one line naming the option and the fix."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from dfw.errors import ConfigError
from tests.attention.helpers import CONF, PRESETS, C, D, H, build, preset

BAD = [
    (
        {"update_rule": "delta", "normalization": "none"},
        r"update_rule=delta needs attention\.normalization=sum",
    ),
    ({"update_rule": "delta", "normalization": "denominator", "feature_map": "elu"}, r"normalization=sum"),
    ({"normalization": "sum", "feature_map": "linear"}, r"normalization=sum needs non-negative features"),
    (
        {"normalization": "denominator", "feature_map": "identity", "state_size": None},
        r"denominator needs a positive kernel",
    ),
    ({"feature_map": "favor", "normalization": "none"}, r"feature_map=favor needs attention\.normalization"),
    (
        {"feature_map": "dpfp", "state_size": 64},
        r"dpfp has state size .* = 16, got state_size=64; set attention\.state_size=null",
    ),
    ({"feature_map": "elu", "state_size": 3}, r"elu has state size"),
    ({"feature_map": "rff", "state_size": 7, "normalization": "denominator"}, r"even state_size"),
    (
        {"feature_map": "hedgehog", "state_size": 7, "normalization": "denominator"},
        r"hedgehog needs an even state_size",
    ),
    ({"feature_map": "softmax"}, r"attention\.feature_map must be one of"),
    ({"update_rule": "gate"}, r"attention\.update_rule must be one of"),
    ({"chunk_size": 24}, r"chunk_size must be a positive multiple of 16"),
    (
        {"feature_map": "favor", "normalization": "sum", "redraw_interval": 0},
        r"redraw_interval must be a positive integer",
    ),
    ({"feature_map": "dpfp", "state_size": None, "dpfp_order": 0}, r"dpfp_order must be an integer"),
    ({"gates": "sideways"}, r"attention\.gates must be one of \['both', 'key', 'value'\], got 'sideways'"),
    ({"gatez": "key"}, r"attention has no option gatez; remove it"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_combination_fails_at_build_time_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        build(preset("decay", **overrides))
    assert "\n" not in str(error.value)


def test_softmax_with_a_state_size_is_a_config_error():
    node = OmegaConf.merge(OmegaConf.load(CONF / "attention/softmax.yaml"), {"state_size": 64})
    with pytest.raises(ConfigError, match=r"attention=softmax takes no attention\.state_size") as error:
        build(node)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_names_its_paper(name):
    text = (CONF / "attention" / f"{name}.yaml").read_text()
    assert text.startswith("#") and re.search(r"(19|20)\d\d", text.split("\n")[0] + text.split("\n")[1])
    assert OmegaConf.load(CONF / "attention" / f"{name}.yaml").name == name


def test_gates_and_output_norm_options():
    """gates=key builds only the key gate; output_norm=true is a LayerNorm over each head's output, after the
    same recurrence as without it."""
    torch.manual_seed(0)
    core = build(preset("decay", gates="key", output_norm=True))
    assert core.gate_names == ("key_gate",) and isinstance(core.key_gate, torch.nn.Linear)
    plain = build(preset("decay", gates="key"))
    assert plain.output_norm is None
    plain.load_state_dict({k: v for k, v in core.state_dict().items() if not k.startswith("output_norm.")})
    inputs = (*(torch.randn(1, 5, H, D) for _ in range(3)), torch.randn(1, 5, C))
    o, S = core(*inputs, output_state=True)
    o_plain, S_plain = plain(*inputs, output_state=True)
    assert o.shape == (1, 5, H, D) and S.shape == (1, H, D, D)
    torch.testing.assert_close(S, S_plain)
    torch.testing.assert_close(o, torch.nn.functional.layer_norm(o_plain, (D,)))
