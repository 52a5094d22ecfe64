"""Attention transfer: before fine-tuning, teach each converted layer to reproduce softmax attention.

Only the parameters that conversion added train (`transformer.h.<i>.attn.core.*`: feature maps, gates,
write strengths, scales); every pretrained weight is frozen. Each layer computes, from its own q, k, v,
both the pretrained softmax output (the target) and the converted core's output; the softmax output is
what flows on to the next layer, so every layer learns at once from the inputs the pretrained model
itself produces (LoLCATs' "attention transfer", Zhang et al. 2024), and no second copy of the model is
kept. The whole forward runs without gradients except inside the cores, and stops before the LM head.

    transfer.loss=output_mse    |o - o_softmax|^2 / mean(o_softmax^2), per layer       (LoLCATs)
    transfer.loss=attention_ce  cross-entropy between softmax attention weights and the normalised kernel
                                scores phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j')   (Hedgehog)
                                (additive rule with a denominator: there the scores are the weights)

`transfer.calibrate=true` is a conversion initialisation for DFW (feature_map=linear, no normaliser):
on one batch, each head's output is scaled so that its RMS matches softmax's. The output is bilinear in
phi, so scaling W_h by c scales the head's output by exactly c^2, and the scale lives in the feature
map's own weights (exports need nothing new). With `attention.window` (and no score sum to share), the
core fits the memory's weight alpha_h instead, by least squares against the softmax output (the window's
part is softmax already); the core says what it fits (`AttentionCore.calibration_fit`, `apply_calibration`).
With a window the target is still the layer's full softmax output, over every earlier token.

What the stage needs from a core is `AttentionCore`'s stated interface, never its internals: the
parameters it trains (`transfer_parameters`), the attention weights the teacher compares with
(`has_attention_weights`, `attention_weights`) and the calibration hook (`output_scale_calibratable`,
`scale_output`). What a checkpoint of the stage carries besides the stage marker is fine-tuning's
(`dfw.module.store_run_state`).

`run_transfer` is the stage `dfw.train` runs between validating the converted model and fine-tuning:
a Trainer of its own (the run's trainer settings, `transfer.steps` steps), logging `transfer/loss` and
`transfer/loss_layer<i>`, and checkpoints `transfer-last.ckpt` (tagged `dfw_stage: transfer`,
`dfw.loading.STAGE_KEY`) that `ckpt_path=` resumes inside the stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import ConvertedAttention
from .checkpointing import CrashCheckpoint, LatestCheckpoint
from .errors import ConfigError
from .loading import STAGE_KEY
from .module import restore_run_state, store_run_state

log = logging.getLogger(__name__)

LOSSES = ("output_mse", "attention_ce")


def new_parameters(net: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the stage trains, by name: what each converted layer's core names
    (`transfer_parameters`)."""
    own = {id(p) for layer in converted_layers(net) for p in layer.core.transfer_parameters()}
    return {name: p for name, p in net.named_parameters() if id(p) in own}


def converted_layers(net: nn.Module) -> list[ConvertedAttention]:
    return [m for m in net.modules() if isinstance(m, ConvertedAttention)]


def softmax_weights(q: Tensor, k: Tensor, scaling: float) -> Tensor:
    """Causal softmax attention weights [B, H, T, T] from q, k [B, T, H, D]."""
    T = q.shape[1]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scaling  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


class LayerTeacher:
    """Set on a ConvertedAttention as `.teacher`: returns the softmax output (it flows on) and keeps the
    core's transfer loss against it in `.loss` (or, when `calibrating`, per-head output RMS)."""

    def __init__(self, loss: str):
        self.loss_name = loss
        self.loss: Tensor | None = None
        self.calibrating = False
        self.rms: tuple[Tensor, Tensor] | None = None  # (softmax, core), [H] each
        self.factor: Tensor | None = None  # (H,): the core's calibration fit (`calibration_fit`)

    def __call__(self, attn: ConvertedAttention, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> Tensor:
        target = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=attn.scaling
        ).transpose(1, 2)  # (B, T, H, D)
        if self.calibrating:
            o, _ = attn.core(q, k, v, x)  # (B, T, H, D)
            rms = lambda t: (
                t.to(torch.promote_types(t.dtype, torch.float32)).square().mean(dim=(0, 1, 3)).sqrt()
            )  # (H,)
            self.rms = (rms(target), rms(o))
            if attn.core.output_scale_calibratable:
                self.factor = attn.core.calibration_fit(q, k, v, x, o, target)  # (H,)
            return target
        with torch.enable_grad():
            if self.loss_name == "attention_ce":
                weights = softmax_weights(q, k, attn.scaling)  # (B, H, T, T)
                estimate = attn.core.attention_weights(q, k)  # (B, H, T, T)
                # -sum_j A_ij log A^_ij; masked entries have A_ij = 0 and contribute nothing.
                self.loss = -(weights * estimate.clamp_min(1e-12).log()).sum(-1).mean()
            else:
                o, _ = attn.core(q, k, v, x)  # (B, T, H, D)
                target32 = target.float()
                self.loss = (o.float() - target32).square().mean() / target32.square().mean().clamp_min(1e-12)
        return target


@contextmanager
def teacher_forcing(net: nn.Module, loss: str = "output_mse") -> Iterator[list[LayerTeacher]]:
    """Inside: every converted layer passes softmax on and records its transfer loss; only the new
    parameters require gradients. Both are undone on exit."""
    layers = converted_layers(net)
    teachers = [LayerTeacher(loss) for _ in layers]
    trainable = {name: p.requires_grad for name, p in net.named_parameters()}
    new = new_parameters(net)
    try:
        for name, p in net.named_parameters():
            p.requires_grad_(name in new and trainable[name])
        for layer, teacher in zip(layers, teachers, strict=True):
            layer.teacher = teacher
        yield teachers
    finally:
        for layer in layers:
            layer.teacher = None
        for name, p in net.named_parameters():
            p.requires_grad_(trainable[name])


def run_teacher_forced(net: nn.Module, input_ids: Tensor) -> None:
    """The pretrained forward without gradients and without the LM head (the cores record their losses)."""
    with torch.no_grad():
        net.transformer(input_ids=input_ids, use_cache=False)


@torch.no_grad()
def calibrate_output_scale(net: nn.Module, input_ids: Tensor) -> int:
    """Scale each head's output so the core's output RMS matches softmax's on `input_ids`.

    Applies to cores whose output scale is calibratable (`AttentionCore.output_scale_calibratable`: DFW,
    feature_map=linear and no normaliser, where W_h <- W_h sqrt(rms_softmax / rms_core) makes the two RMS
    equal; with a window, any core without a score sum, whose alpha_h is fit by least squares); all layers
    at once, each from the teacher's inputs. Returns the number of layers calibrated
    (0: nothing to calibrate).
    """
    layers = [layer for layer in converted_layers(net) if layer.core.output_scale_calibratable]
    if not layers:
        return 0
    with teacher_forcing(net) as teachers:
        for teacher in teachers:
            teacher.calibrating = True
        run_teacher_forced(net, input_ids)
    by_layer = {id(layer): teacher for layer, teacher in zip(converted_layers(net), teachers, strict=True)}
    for layer in layers:
        factor = by_layer[id(layer)].factor  # (H,)
        assert factor is not None  # the layer is calibratable
        layer.core.apply_calibration(factor)
        log.info(
            "transfer.calibrate: layer %d, per head %s (the output scale; with a window, alpha_h)",
            layer.layer_idx,
            ", ".join(f"{f:.3g}" for f in factor.tolist()),
        )
    return len(layers)


class AttentionTransfer(L.LightningModule):
    """The transfer stage as a LightningModule over the same `net` as fine-tuning (state-dict keys `net.*`).

    Args:
        net: the converted GPT2LMHeadModel.
        loss: output_mse | attention_ce.
        lr: AdamW learning rate of the new parameters (constant; no weight decay).
        run_config: the resolved run config, stored in checkpoints as fine-tuning's are.
    """

    def __init__(
        self, net: nn.Module, loss: str = "output_mse", lr: float = 1e-2, run_config: dict | None = None
    ):
        super().__init__()
        self.net, self.loss_name, self.lr = net, loss, lr
        # As in LanguageModel: the run config in the checkpoint, so a resume can check it continues this run.
        self.save_hyperparameters({"config": run_config})
        self.teachers: list[LayerTeacher] = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The teacher is the pretrained model as it evaluates: no dropout in its targets or hidden states.
        self.net.eval()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        run_teacher_forced(self.net, batch["input_ids"])
        losses = [teacher.loss for teacher in self.teachers]
        loss = torch.stack(losses).mean()
        self.log("transfer/loss", loss, prog_bar=True)
        for i, layer_loss in enumerate(losses):
            self.log(f"transfer/loss_layer{i}", layer_loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            [p for p in self.net.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What a fine-tuning checkpoint carries (W&B run id, model config, RNG states), and the stage.
        store_run_state(self, checkpoint)
        checkpoint[STAGE_KEY] = "transfer"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_run_state(checkpoint)


def check_transfer_config(transfer: Any) -> None:
    if transfer.loss not in LOSSES:
        raise ConfigError(f"transfer.loss must be one of {list(LOSSES)}, got {transfer.loss!r}")
    if not isinstance(transfer.steps, int) or transfer.steps < 0:
        raise ConfigError(
            f"transfer.steps must be a non-negative integer (0: no transfer stage), got {transfer.steps!r}"
        )


def run_transfer(
    transfer: Any,
    net: nn.Module,
    datamodule: L.LightningDataModule,
    make_trainer: Callable[..., L.Trainer],
    checkpoint_dir: str | None,
    ckpt_path: str | None = None,
    run_config: dict | None = None,
) -> bool:
    """The transfer stage (config node `transfer`); returns whether it changed the model.

    `make_trainer(**overrides)` builds a Trainer from the run's trainer config; `ckpt_path` resumes a
    checkpoint taken inside this stage.
    """
    check_transfer_config(transfer)
    if transfer.steps == 0 and not transfer.calibrate:
        return False
    name = type(converted_layers(net)[0].core).__name__ if converted_layers(net) else "none"
    new = new_parameters(net)
    changed = False
    if transfer.calibrate and ckpt_path is None:
        batch = next(iter(datamodule.train_dataloader()))["input_ids"]
        changed = calibrate_output_scale(net, batch) > 0
        if not changed:
            log.info(
                "transfer.calibrate: no core with a linear feature map and no normaliser (DFW); nothing to "
                "calibrate"
            )
    if transfer.steps == 0:
        return changed
    if not new:
        log.info("attention transfer: %s adds no parameters to learn; skipping the stage", name)
        return changed
    if transfer.loss == "attention_ce" and not all(
        layer.core.has_attention_weights for layer in converted_layers(net)
    ):
        raise ConfigError(
            "transfer.loss=attention_ce needs kernel attention weights (update_rule=add with "
            "normalization=denominator, e.g. attention=hedgehog, linear or t2r); use "
            "transfer.loss=output_mse for this attention"
        )
    log.info(
        "attention transfer: %d steps, loss %s, %s new parameters trained, every other weight frozen",
        transfer.steps,
        transfer.loss,
        f"{sum(p.numel() for p in new.values()):,}",
    )
    callbacks = []
    if checkpoint_dir:
        # The same guarantees as fine-tuning's checkpoints (dfw/checkpointing.py): atomic writes, the latest
        # state every N steps and at a Ctrl-C, a crash checkpoint that never replaces another file.
        callbacks += [
            LatestCheckpoint(
                checkpoint_dir, every_n_steps=transfer.checkpoint_every, filename="transfer-last"
            ),
            CrashCheckpoint(checkpoint_dir, filename="transfer-on-exception"),
        ]
    trainer = make_trainer(
        max_steps=transfer.steps,
        callbacks=callbacks,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=bool(checkpoint_dir),
        enable_model_summary=False,
    )
    module = AttentionTransfer(net, loss=transfer.loss, lr=transfer.lr, run_config=run_config)
    training = net.training
    with teacher_forcing(net, transfer.loss) as teachers:
        module.teachers = teachers
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    net.train(training)
    return True
