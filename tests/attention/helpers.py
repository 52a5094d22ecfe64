"""Building attention cores the way surgery does: conf/attention/<preset>.yaml, shrunk to test sizes."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from dfw.attention import FastWeightAttention
from dfw.model import core_factory

CONF = Path(__file__).resolve().parents[2] / "conf"
# Every preset in conf/attention/ (a new one is tested by adding its yaml).
PRESETS = tuple(sorted(path.stem for path in (CONF / "attention").glob("*.yaml")))
RECURRENT_PRESETS = tuple(p for p in PRESETS if p != "softmax")
# Test sizes: hidden size C, heads H, head size D; T is odd and not a multiple of the chunk size.
C, H, D, CHUNK = 16, 2, 8, 16


def preset(name: str, **overrides):
    """The preset's config node with `overrides` applied (state_size shrunk to the test head size)."""
    node = OmegaConf.load(CONF / "attention" / f"{name}.yaml")
    if node.get("state_size") is not None and "state_size" not in overrides:
        overrides["state_size"] = D
    return OmegaConf.merge(node, overrides)


def build(node, layer_idx: int = 0) -> FastWeightAttention:
    return core_factory(node)(hidden_size=C, num_heads=H, head_dim=D, layer_idx=layer_idx, scaling=None)


def random_state(core: FastWeightAttention, batch: int, dtype=torch.float64) -> torch.Tensor:
    """A plausible initial state: for a denominator, the z column is positive (it sums features)."""
    columns = core.head_dim + (core.normalization == "denominator")
    state = torch.randn(batch, core.num_heads, core.state_size, columns, dtype=dtype)
    if core.normalization == "denominator":
        state[..., -1] = torch.rand_like(state[..., -1]) + 0.5
    return state
