"""The registries the fast-weight core composes: update rules and feature maps, each tested through the
registry, so an entry added there is tested here without a new line (the forms: test_attention_forms.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dfw_kernels.testing import relative_rms_error as rel
from torch import nn

from dfw.attention import FEATURE_MAPS, NORMALIZATIONS, UPDATE_RULES, TokenInputs, UpdateRule
from dfw.attention.update_rules.base import gate_logits, zero_weight_gate
from dfw.errors import ConfigError
from tests.attention.helpers import C, D, H, build, preset, random_state, rule_cases

RULE_CASES = rule_cases()


def test_every_rule_file_is_registered():
    assert set(UPDATE_RULES) >= {"add", "gated", "delta", "decay"}
    for name, rule in UPDATE_RULES.items():
        assert issubclass(rule, UpdateRule) and rule.name == name
    assert {case.split("-")[0] for case, _ in RULE_CASES} == set(
        UPDATE_RULES
    )  # every rule takes some normalisation


# The state-dict keys of the new parameters, per rule: exported models and checkpoints load by them.
SAVED_KEYS = {
    "add": set(),
    "gated": {"head_gate.weight", "head_gate.bias"},
    "delta": {"write_strength.weight", "write_strength.bias"},
    "decay": {"key_gate.weight", "key_gate.bias", "value_gate.weight", "value_gate.bias"},
}


@pytest.mark.parametrize("rule", sorted(SAVED_KEYS))
def test_state_dict_keys_of_the_rules_are_the_ones_checkpoints_hold(rule):
    normalization = "sum" if rule == "delta" else "none"
    core = build(
        preset("decay", update_rule=rule, normalization=normalization, feature_map="elu", state_size=None)
    )
    assert {key for key in core.state_dict() if not key.startswith("feature_map.")} == SAVED_KEYS[rule]


@pytest.mark.parametrize(("name", "node"), RULE_CASES, ids=[name for name, _ in RULE_CASES])
def test_at_conversion_every_gate_is_a_constant_of_its_bias(name, node):
    """Gate weights start at zero: the token-wise inputs do not depend on the block input x yet."""
    torch.manual_seed(0)
    core = build(node).double()
    assert set(core.gate_names) == set(core.rule.gates())
    for gate_name in core.gate_names:
        assert torch.count_nonzero(getattr(core, gate_name).weight) == 0, gate_name
    q, k, v = (torch.randn(1, 5, H, D, dtype=torch.float64) for _ in range(3))
    first, second = (core._prepare(q, k, v, torch.randn(1, 5, C, dtype=torch.float64)) for _ in range(2))
    assert isinstance(first, TokenInputs)
    for field, a, b in zip(TokenInputs._fields, first, second, strict=True):
        assert (a is None) == (b is None), field
        if a is not None:
            assert torch.equal(a, b), field


@pytest.mark.parametrize("rule", sorted(UPDATE_RULES))
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_a_rule_refuses_a_normalisation_in_one_line_when_the_core_is_built(rule, normalization):
    node = preset("decay", update_rule=rule, normalization=normalization, feature_map="elu", state_size=None)
    try:
        UPDATE_RULES[rule].check("elu", normalization)
    except ConfigError:
        with pytest.raises(ConfigError, match=rf"update_rule={rule} needs") as error:
            build(node)
        assert "\n" not in str(error.value)
    else:
        build(node)


@pytest.fixture
def forgetful_rule():
    """A rule written as CONTRIBUTING.md's walkthrough says: S_t = a_t S_{t-1} + phi(k_t)^T v_t with one
    learned scalar forget gate a_t = sigmoid(w_h . x_t + b_h) per head (gated without the 1 - g_t on the
    write). Defining the class registers it; the fixture takes it out again."""

    class ForgetfulRule(UpdateRule):
        name = "test_forgetful"

        def gates(self) -> dict[str, nn.Module]:
            return {"forget_gate": zero_weight_gate(self.hidden_size, torch.full((self.num_heads,), 3.0))}

        def token_inputs(self, gates, x, inputs: TokenInputs) -> TokenInputs:
            return inputs._replace(
                log_key_gate=F.logsigmoid(gate_logits(gates["forget_gate"], x, self.num_heads))
            )

    assert UPDATE_RULES["test_forgetful"] is ForgetfulRule
    yield "test_forgetful"
    del UPDATE_RULES["test_forgetful"]


def test_a_new_rule_is_one_class(forgetful_rule):
    """No line of the core names a rule: a new one builds, keeps its parameters under its own keys,
    and its forms agree with its recurrence written out."""
    torch.manual_seed(0)
    core = build(preset("decay", update_rule=forgetful_rule, chunk_size=16, state_size=None)).double().eval()
    assert {key for key in core.state_dict() if "gate" in key} == {"forget_gate.weight", "forget_gate.bias"}
    with torch.no_grad():
        core.forget_gate.weight.normal_()
    q, k, v = (torch.randn(2, 21, H, D, dtype=torch.float64) for _ in range(3))
    x = torch.randn(2, 21, C, dtype=torch.float64)
    S0 = random_state(core, 2)
    o_par, S_par = core(q, k, v, x, S0, output_state=True)
    S, outputs = S0, []
    a = torch.sigmoid(core.forget_gate(x)).view(2, 21, H)  # (B, T, H)
    phi_q, phi_k = core.feature_map(q) * D**-0.5, core.feature_map(k)  # normalization=none: read scaled
    for t in range(21):
        S = a[:, t, :, None, None] * S + phi_k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, m, D)
        outputs.append(torch.einsum("bhm,bhmd->bhd", phi_q[:, t], S))
    assert rel(o_par, torch.stack(outputs, dim=1)) < 1e-10 and rel(S_par, S) < 1e-10


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_feature_map_capabilities_are_true_of_the_map(name):
    """`nonnegative` maps give features >= 0; `positive_kernel` maps give phi(q) . phi(k) > 0 on average."""
    torch.manual_seed(0)
    cls = FEATURE_MAPS[name]
    phi = cls(H, D, 2048 if name in ("favor", "rff") else None, {"dpfp_order": 1})
    x, y = torch.randn(1, 64, H, D), torch.randn(1, 64, H, D)
    features = phi(x)
    if cls.nonnegative:
        assert (features >= 0).all()
        assert cls.positive_kernel  # a sum of products of non-negative features is non-negative
    else:
        assert (features < 0).any()
    scores = torch.einsum("bthm,bshm->bhts", phi(x, is_query=True), phi(y))  # (1, H, 64, 64)
    if cls.positive_kernel:
        assert (scores.mean(-1) > 0).all()
    else:
        assert (scores < 0).float().mean() > 0.2  # signed scores: a denominator would cross zero


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_the_core_accepts_a_normalisation_exactly_when_the_map_can_take_it(name, normalization):
    cls = FEATURE_MAPS[name]
    allowed = {
        "sum": cls.nonnegative,
        "denominator": cls.positive_kernel,
        "none": not cls.needs_normalization,
    }
    node = preset("decay", feature_map=name, normalization=normalization, update_rule="add", state_size=None)
    if allowed[normalization]:
        build(node)
    else:
        with pytest.raises(ConfigError, match=rf"normalization|feature_map={name}"):
            build(node)


def test_the_three_registries_are_filled_the_same_way():
    from dfw.attention import FeatureMap, Normalization
    from dfw.attention.registry import Registered

    for base, registry in (
        (UpdateRule, UPDATE_RULES),
        (FeatureMap, FEATURE_MAPS),
        (Normalization, NORMALIZATIONS),
    ):
        assert issubclass(base, Registered) and base.registry is registry
        assert registry and all(issubclass(cls, base) and cls.name == name for name, cls in registry.items())
    assert list(NORMALIZATIONS) == ["none", "denominator", "sum"]
    assert list(FEATURE_MAPS) == ["identity", "linear", "elu", "relu_mlp", "favor", "rff", "dpfp", "hedgehog"]


@pytest.fixture
def squared_map_and_halved_output():
    """A feature map phi(x) = x^2 and a normalisation o <- o / 2, each defined as one class (so
    registered)."""
    from dfw.attention import FeatureMap, Normalization

    class SquaredFeatureMap(FeatureMap):
        name = "test_squared"
        nonnegative = positive_kernel = True

        def forward(self, x, is_query=False):
            return x * x

    class HalvedOutput(Normalization):
        name = "test_halved"
        cancels_feature_scale = False

        def output(self, o):
            return o / 2

    assert FEATURE_MAPS["test_squared"] is SquaredFeatureMap and NORMALIZATIONS["test_halved"] is HalvedOutput
    yield "test_squared", "test_halved"
    del FEATURE_MAPS["test_squared"], NORMALIZATIONS["test_halved"]


def test_a_new_feature_map_and_normalisation_are_one_class_each(squared_map_and_halved_output):
    feature_map, normalization = squared_map_and_halved_output
    node = preset(
        "decay", feature_map=feature_map, normalization=normalization, update_rule="add", state_size=None
    )
    core = build(node).double()
    q, k, v = (torch.randn(1, 7, H, D, dtype=torch.float64) for _ in range(3))
    o, _ = core(q, k, v, torch.randn(1, 7, C, dtype=torch.float64))
    scores = torch.einsum("bihd,bjhd->bhij", q * q * D**-0.5, k * k).tril()  # (B, H, T, T), causal
    expected = torch.einsum("bhij,bjhd->bihd", scores, v) / 2
    assert rel(o, expected) < 1e-12
