"""Building attention cores the way surgery does: conf/attention/<preset>.yaml, shrunk to test sizes."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from dfw.attention import FEATURE_MAPS, NORMALIZATIONS, UPDATE_RULES, FastWeightAttention
from dfw.errors import ConfigError
from dfw.model import core_factory

CONF = Path(__file__).resolve().parents[2] / "conf"
PRESETS = tuple(
    sorted(path.stem for path in (CONF / "attention").glob("*.yaml"))
)  # a new preset is tested by adding it
RECURRENT_PRESETS = tuple(p for p in PRESETS if p != "softmax")
# Test sizes: hidden size C, heads H, head size D; T is odd and not a multiple of the chunk size.
C, H, D, CHUNK = 16, 2, 8, 16


def preset(name: str, **overrides):
    """The preset's config node with `overrides` applied."""
    return OmegaConf.merge(OmegaConf.load(CONF / "attention" / f"{name}.yaml"), overrides)


def rule_cases(feature_map: str = "elu") -> list[tuple[str, object]]:
    """(id, node) for every registered update rule with every normalisation it accepts, on a feature map
    that takes all three (elu + 1): a rule added to UPDATE_RULES is tested by these cases without a line
    here."""
    assert FEATURE_MAPS[feature_map].nonnegative and FEATURE_MAPS[feature_map].positive_kernel
    cases = []
    for rule, rule_class in UPDATE_RULES.items():
        for normalization in NORMALIZATIONS:
            try:
                rule_class.check(feature_map, normalization)
            except ConfigError:
                continue
            options = dict(
                feature_map=feature_map, update_rule=rule, normalization=normalization, state_size=None
            )
            cases.append((f"{rule}-{normalization}", preset("decay", **options)))
    return cases


def build(node, layer_idx: int = 0) -> FastWeightAttention:
    return core_factory(node)(hidden_size=C, num_heads=H, head_dim=D, layer_idx=layer_idx, scaling=None)


def build_at_gpt2_shapes(node):
    """The core a config node gives one layer of GPT-2 small (as surgery builds it), after a check that its
    parallel form runs: finite outputs of the right shape for 5 tokens, and the configured state size."""
    core = core_factory(node)(hidden_size=768, num_heads=12, head_dim=64, layer_idx=0, scaling=0.125)
    q, k, v = (torch.randn(1, 5, 12, 64) for _ in range(3))
    with torch.no_grad():
        o, _ = core(q, k, v, torch.randn(1, 5, 768))
    assert o.shape == (1, 5, 12, 64) and torch.isfinite(o).all(), node
    if node.get("state_size") is not None:
        assert core.state_size == node.state_size, node
    return core


def random_state(core: FastWeightAttention, batch: int, dtype=torch.float64) -> torch.Tensor:
    """A plausible initial state: for a denominator, the z column is positive (it sums features)."""
    columns = core.head_dim + (core.normalization == "denominator")
    state = torch.randn(batch, core.num_heads, core.state_size, columns, dtype=dtype)
    if core.normalization == "denominator":
        state[..., -1] = torch.rand_like(state[..., -1]) + 0.5
    return state
