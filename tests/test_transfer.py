"""Attention transfer (dfw/transfer.py): teacher forcing, losses, calibration, and the stage through the
real config."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dfw.errors import ConfigError
from dfw.model import core_factory
from dfw.surgery import convert_attention
from dfw.train import train
from dfw.transfer import (
    calibrate_output_scale,
    new_parameters,
    run_teacher_forced,
    teacher_forcing,
)
from tests.attention.helpers import preset
from tests.conftest import compose, tiny_overrides

VOCAB, LAYERS, HEADS, WIDTH, T = 50, 2, 2, 32, 24


def _converted(name: str, **overrides) -> tuple[GPT2LMHeadModel, GPT2LMHeadModel]:
    """(softmax GPT-2, the same weights converted to preset `name`), tiny and random, float64."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    softmax = GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for block in softmax.transformer.h:
            block.attn.c_attn.weight.mul_(8.0)  # peaked attention, as in a trained model (not uniform)
    converted = GPT2LMHeadModel(config).double().eval()
    converted.load_state_dict(softmax.state_dict())
    node = (
        preset(name, **{"state_size": WIDTH // HEADS, **overrides})
        if name != "hedgehog"
        else preset(name, **overrides)
    )
    convert_attention(converted, core_factory(node))
    return softmax, converted.double()


def _ids(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(1))


def test_teacher_forcing_passes_the_softmax_output_on():
    """Under teacher forcing the converted model's hidden states are the softmax model's, exactly."""
    softmax, converted = _converted("decay")
    ids = _ids()
    expected = softmax.transformer(input_ids=ids).last_hidden_state
    with teacher_forcing(converted) as teachers:
        actual = converted.transformer(input_ids=ids).last_hidden_state
        assert all(teacher.loss is not None and teacher.loss > 0 for teacher in teachers)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    # Outside, the converted layers run their own cores again.
    assert (converted.transformer(input_ids=ids).last_hidden_state - expected).abs().max() > 1e-3
    assert all(layer.attn.teacher is None for layer in converted.transformer.h)


@pytest.mark.parametrize(
    ("name", "loss", "window"),
    [
        ("decay", "output_mse", None),
        ("hedgehog", "attention_ce", None),
        ("hedgehog", "output_mse", None),
        ("decay", "output_mse", 4),  # attention.window: the target is still the full softmax output
        ("hedgehog", "attention_ce", 4),
    ],
)
def test_transfer_steps_train_only_the_new_parameters_and_lower_the_loss(name, loss, window):
    _, net = _converted(name, window=window)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    new = new_parameters(net)
    assert new, name
    ids = _ids()
    losses = []
    with teacher_forcing(net, loss) as teachers:
        assert {n for n, p in net.named_parameters() if p.requires_grad} == set(new)
        optimizer = torch.optim.AdamW(
            [p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
        )
        for _ in range(30):
            run_teacher_forced(net, ids)
            total = torch.stack([t.loss for t in teachers]).mean()
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            losses.append(float(total))
    # The cross-entropy cannot fall below the softmax weights' own entropy: ask for an absolute drop there.
    assert losses[-1] < (0.85 * losses[0] if loss == "output_mse" else losses[0] - 0.05), losses
    for key, value in net.state_dict().items():
        moved = not torch.equal(value, before[key])
        assert moved == (".attn.core." in key and key in new), key
    assert all(p.requires_grad for p in net.parameters())  # restored on exit


def test_attention_weights_are_what_the_core_applies_to_v():
    """attention_ce's estimate is the core's own attention: attention_weights @ v equals its output."""
    _, net = _converted("hedgehog")
    core = net.transformer.h[0].attn.core
    decay = _converted("decay")[1].transformer.h[0].attn.core
    assert core.has_attention_weights and not decay.has_attention_weights
    with torch.no_grad():
        for p in core.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q, k, v = (torch.randn(2, T, HEADS, WIDTH // HEADS, dtype=torch.float64) for _ in range(3))
    o, _ = core(q, k, v, torch.randn(2, T, WIDTH, dtype=torch.float64))
    weights = core.attention_weights(q, k)  # (B, H, T, T)
    expected = torch.einsum("bhij,bjhd->bihd", weights, v)
    torch.testing.assert_close(o, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))


@pytest.mark.parametrize("name", ["hedgehog", "linear"])
def test_with_a_window_the_attention_weights_are_what_the_core_applies_to_v(name):
    """The shared normaliser is attention too: exp(s) in the window, phi(q) . phi(k) before it, normalised."""
    _, net = _converted(name, window=5)
    core = net.transformer.h[0].attn.core
    assert core.has_attention_weights
    with torch.no_grad():
        for p in core.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q, k, v = (torch.randn(2, T, HEADS, WIDTH // HEADS, dtype=torch.float64) for _ in range(3))
    o, _ = core(q, k, v, torch.randn(2, T, WIDTH, dtype=torch.float64))
    weights = core.attention_weights(q, k)  # (B, H, T, T)
    torch.testing.assert_close(o, torch.einsum("bhij,bjhd->bihd", weights, v), rtol=1e-9, atol=1e-9)
    assert (weights.triu(1) == 0).all()


def test_with_a_window_calibration_fits_the_memory_weight_by_least_squares():
    """transfer.calibrate on DFW with a window sets each head's alpha_h to the least-squares fit of the
    output to softmax's: the transfer loss is then at a minimum in every alpha_h, lower than at conversion."""
    _, net = _converted("decay", window=4)
    ids = _ids()

    def loss() -> float:
        with teacher_forcing(net) as teachers:
            run_teacher_forced(net, ids)
        return float(torch.stack([t.loss for t in teachers]).sum())

    at_conversion = loss()
    assert calibrate_output_scale(net, ids) == LAYERS
    calibrated = loss()
    assert calibrated < at_conversion
    for block in net.transformer.h:
        weight = block.attn.core.memory_weight
        assert (weight != 0).all()  # fit from 0 (conversion: the window alone)
        for head in range(HEADS):
            for step in (1.3, 0.7):  # a minimum: either way up (the loss is float32)
                with torch.no_grad():
                    weight[head] *= step
                assert loss() > calibrated
                with torch.no_grad():
                    weight[head] /= step


def test_what_each_preset_offers_attention_transfer():
    """The core says what transfer may do with it: attention_ce where the output is normalised kernel weights
    applied to v (additive rule, denominator), calibration where the output is bilinear in a linear map."""
    from tests.attention.helpers import PRESETS, build

    cores = {
        name: build(preset(name, **({} if name in ("softmax", "hedgehog", "delta") else {"state_size": 8})))
        for name in PRESETS
    }
    assert {name for name, core in cores.items() if core.has_attention_weights} == {
        "hedgehog",
        "linear",
        "performer",
        "t2r",
    }
    assert {name for name, core in cores.items() if core.output_scale_calibratable} == {"decay"}
    for name, core in cores.items():  # what transfer trains: the core's own parameters, all of them
        assert {id(p) for p in core.transfer_parameters()} == {id(p) for p in core.parameters()}, name
    with pytest.raises(NotImplementedError):
        cores["rfa"].attention_weights(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8))


def test_scale_output_multiplies_each_heads_output_exactly():
    from tests.attention.helpers import build

    torch.manual_seed(0)
    core = build(preset("decay")).double()
    inputs = (
        *(torch.randn(2, 9, 2, 8, dtype=torch.float64) for _ in range(3)),
        torch.randn(2, 9, 16, dtype=torch.float64),
    )
    before, _ = core(*inputs)
    factor = torch.tensor([0.25, 3.0], dtype=torch.float64)
    core.scale_output(factor)
    after, _ = core(*inputs)
    torch.testing.assert_close(after, before * factor[:, None], rtol=1e-12, atol=1e-12)


def test_calibration_matches_each_heads_output_rms_to_softmax():
    _, net = _converted("decay")
    ids = _ids()

    def rms_ratio():
        with teacher_forcing(net) as teachers:
            for teacher in teachers:
                teacher.calibrating = True
            run_teacher_forced(net, ids)
        return torch.stack([t.rms[1] / t.rms[0] for t in teachers])  # (layers, H)

    assert (rms_ratio() - 1).abs().max() > 0.1  # DFW as converted: off scale
    assert calibrate_output_scale(net, ids) == LAYERS
    torch.testing.assert_close(
        rms_ratio(), torch.ones(LAYERS, HEADS, dtype=torch.float64), rtol=1e-9, atol=1e-9
    )
    # Presets with a normaliser have no scale to calibrate.
    assert calibrate_output_scale(_converted("hedgehog")[1], ids) == 0


def _transfer_run(tmp_path, text_files, *extra):
    overrides = ["attention=decay", "attention.state_size=32", "test=false", "export_dir=null", *extra]
    return compose(*tiny_overrides(tmp_path, text_files, *overrides))


def test_transfer_stage_through_the_config_logs_per_layer_losses_and_ppl(tmp_path, text_files):
    cfg = _transfer_run(
        tmp_path, text_files, "transfer.steps=6", "transfer.calibrate=true", "trainer.max_steps=2"
    )
    metrics = train(cfg)
    # A random tiny teacher: its perplexity says little; that the stage ran and was validated, it does.
    assert torch.isfinite(torch.tensor(metrics["val/ppl_transfer"]))
    assert metrics["val/ppl_transfer"] != metrics["val/ppl_converted"]
    import csv

    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    layer_losses = [float(row["transfer/loss_layer1"]) for row in rows if row.get("transfer/loss_layer1")]
    assert len(layer_losses) == 6 and layer_losses[-1] < layer_losses[0]
    assert any(row.get("model/params_trainable") for row in rows)
    assert (tmp_path / "run" / "checkpoints" / "transfer-last.ckpt").is_file()


def test_resume_inside_the_transfer_stage_is_exact(tmp_path, text_files):
    """4 transfer + 2 fine-tuning steps in one go == 2 transfer steps, then resume from transfer-last.ckpt."""
    common = ["transfer.checkpoint_every=2", "trainer.max_steps=2", "module.scheduler.num_training_steps=2"]
    train(_transfer_run(tmp_path / "straight", text_files, *common, "transfer.steps=4"))
    train(_transfer_run(tmp_path / "first", text_files, *common, "transfer.steps=2"))
    stage_ckpt = tmp_path / "first" / "run" / "checkpoints" / "transfer-last.ckpt"
    checkpoint = torch.load(stage_ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["dfw_stage"] == "transfer" and checkpoint["global_step"] == 2
    for finetuned in stage_ckpt.parent.glob(
        "[!t]*.ckpt"
    ):  # as if interrupted inside the stage: no fine-tuning yet
        finetuned.unlink()
    train(
        _transfer_run(
            tmp_path / "resumed", text_files, *common, "transfer.steps=4", f"ckpt_path={stage_ckpt}"
        )
    )
    expected = torch.load(tmp_path / "straight" / "run" / "checkpoints" / "last.ckpt", weights_only=True)[
        "state_dict"
    ]
    actual = torch.load(tmp_path / "first" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert actual["global_step"] == 2 and "dfw_stage" not in actual
    for key in expected:
        torch.testing.assert_close(actual["state_dict"][key], expected[key], rtol=0, atol=0, msg=key)


def test_presets_with_nothing_to_learn_skip_the_stage_in_one_line(tmp_path, text_files, caplog):
    cfg = compose(
        *tiny_overrides(
            tmp_path,
            text_files,
            "attention=performer",
            "transfer.steps=3",
            "test=false",
            "export_dir=null",
            "trainer.max_steps=1",
        )
    )
    with caplog.at_level(logging.INFO, logger="dfw.transfer"):
        metrics = train(cfg)
    assert "val/ppl_transfer" not in metrics
    assert [r.message for r in caplog.records if "skipping" in r.message] == [
        "attention transfer: FastWeightAttention adds no parameters to learn; skipping the stage"
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("transfer.loss=kl", "transfer.loss must be one of"),
        ("transfer.loss=attention_ce", "transfer.loss=attention_ce needs kernel attention weights"),
        ("transfer.steps=-1", "transfer.steps must be a non-negative integer"),
    ],
)
def test_bad_transfer_settings_raise_one_clear_error(tmp_path, text_files, override, message):
    cfg = _transfer_run(tmp_path, text_files, "transfer.steps=2", override)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


@pytest.mark.parametrize("recipe", ["finetune", "transfer_finetune", "transfer_lora"])
def test_recipes_split_the_same_budget(recipe):
    cfg = compose(f"recipe={recipe}", "budget_steps=400", "paths.output_dir=/tmp/unused")
    assert cfg.trainer.max_steps + cfg.transfer.steps == 400
    assert cfg.module.scheduler.num_training_steps == cfg.trainer.max_steps
    with pytest.raises(Exception, match="set budget_steps="):
        compose(f"recipe={recipe}", "paths.output_dir=/tmp/unused").trainer.max_steps  # noqa: B018
