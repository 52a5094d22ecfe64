"""`python -m dfw.bench transfer [--shape demo] [--presets decay,hedgehog]`

Seconds per optimizer step of the attention transfer stage beside a fine-tuning step, on the same model
and batch: fine-tuning is forward + LM head + cross-entropy + backward through every weight + AdamW on
every weight; transfer is the teacher-forced forward without gradients (no LM head) + each layer's core
against softmax + backward through the cores only + AdamW on the new parameters (dfw/transfer.py).
Median (and spread) over repeats after a warm-up, through dfw/bench/timing.py like every benchmark here;
the weights are random (the cost does not depend on them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from dfw.model import core_factory
from dfw.presets import attention_preset, names
from dfw.surgery import convert_attention
from dfw.transfer import run_teacher_forced, teacher_forcing

from .timing import Table, Timing, device_name, time_ms, write_json

# name: (GPT2Config fields, batch, block size)
SHAPES = {
    "demo": (
        dict(n_layer=4, n_head=4, n_embd=128, n_positions=128, vocab_size=4096),
        16,
        128,
    ),  # the CPU demo
    "gpt2-small": (dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257), 8, 1024),
    "tiny": (dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=64), 2, 32),  # smoke test
}


def measure(
    preset: str, shape: str, device: torch.device, warmup: int, repeats: int
) -> dict[str, Timing | None]:
    fields, batch, block = SHAPES[shape]
    torch.manual_seed(0)
    special = fields["vocab_size"] - 1  # GPT-2's 50256 is outside the smaller vocabularies
    config = GPT2Config(
        **fields, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=special, eos_token_id=special
    )
    net = GPT2LMHeadModel(config)
    node = attention_preset(preset)
    if node.get("state_size") is not None:
        node.state_size = config.n_embd // config.n_head  # the head size, as the demo converts DFW
    convert_attention(net, core_factory(node))
    net = net.to(device).train()
    ids = torch.randint(0, config.vocab_size, (batch, block), device=device)

    finetune_optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def finetune_step() -> None:
        logits = net(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, T-1, V)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        finetune_optimizer.zero_grad()
        loss.backward()
        finetune_optimizer.step()

    ms: dict[str, Timing | None] = {
        "fine-tune": time_ms(finetune_step, device, warmup, repeats),
        "transfer": None,
    }
    with teacher_forcing(net) as teachers:
        trainable = [p for p in net.parameters() if p.requires_grad]
        if not trainable:  # a preset with nothing to learn has no transfer stage
            return ms
        transfer_optimizer = torch.optim.AdamW(trainable, lr=1e-2)

        def transfer_step() -> None:
            net.eval()
            run_teacher_forced(net, ids)
            loss = torch.stack([t.loss for t in teachers]).mean()
            transfer_optimizer.zero_grad()
            loss.backward()
            transfer_optimizer.step()

        ms["transfer"] = time_ms(transfer_step, device, warmup, repeats)
    return ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dfw.bench transfer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--presets", default="decay,hedgehog", help="comma-separated conf/attention names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in names("attention")]
    if unknown:
        parser.error(f"no conf/attention/{unknown[0]}.yaml")
    fields, batch, block = SHAPES[args.shape]
    table = Table(
        f"ms per optimizer step, shape {args.shape} ({fields['n_layer']} layers, width {fields['n_embd']}, "
        f"B={batch} T={block}); {device_name(device)}, float32; median ±IQR/2 of {args.repeats} after "
        f"{args.warmup} warm-up",
        ["preset", "fine-tune ms", "transfer ms", "transfer / fine-tune"],
    )
    for preset in presets:
        row = measure(preset, args.shape, device, args.warmup, args.repeats)
        ratio = None if row["transfer"] is None else row["transfer"].median_ms / row["fine-tune"].median_ms
        table.add(
            preset=preset,
            **{
                "fine-tune ms": row["fine-tune"],
                "transfer ms": row["transfer"],
                "transfer / fine-tune": ratio,
            },
        )
    table.print()
    write_json(args.json, "transfer", device, [table], shape=args.shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
