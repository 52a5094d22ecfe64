"""A sliding window of exact softmax attention inside a fast-weight layer (`attention.window=W`).

Each layer's output combines exact softmax attention over the last W real tokens (the token itself and the
W - 1 before it, with the pretrained q, k, v at GPT-2's score scale) with the fast-weight memory of the
tokens before them. A token enters the memory when it leaves the window: the write inputs of the recurrence
(key features, values, the delta rule's write strength) are delayed by W tokens, while the decay gates and
the read stay at the current token,

    M_t = update(M_{t-1}, phi(k_{t-W}), v_{t-W}, gates(x_t))        (no write while t < W)

so M_t holds exactly the tokens the window no longer covers, each decayed from the step it left the window.
This is the layer's own recurrence on shifted inputs: the chunkwise op computes it (`dfw_kernels`, or the
delta rule's WY/UT form, which does not care that keys and queries come from different tokens), and the
recurrent form writes token t - W at step t, the token it evicts from a buffer of the last W tokens.

The combination depends on the normalisation:

- a normaliser that divides by a score sum (`normalization=denominator`) shares one normaliser between the
  window and the memory, as LoLCATs does (Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language
  Models", ICLR 2025):

      o_t = (sum_{j in win} exp(s_tj) v_j + phi(q_t) M_t) / (sum_{j in win} exp(s_tj) + phi(q_t) z_t)

  with s_tj = scaling q_t . k_j. It is computed from the window's normalised output o_win and log-sum-exp
  lse, o_t = o_win exp(lse - log Z) + phi(q_t) M_t exp(-log Z), log Z = logaddexp(lse, log phi(q_t) z_t),
  so no exponential of a score is ever formed. The window's scores meet the memory's unshifted (the sum is
  softmax's own), so that a kernel estimating exp(s) (FAVOR+) weighs the memory as softmax weighs those
  tokens; with the other feature maps the balance is learned (transfer, fine-tuning).
- without one (`none`, DFW, and `sum`), the read has no scale to share, so the memory is added to the
  window's softmax with a learned weight per head, as Liger mixes a sliding window with a gated recurrence
  (Lan et al., "Liger: Linearizing Large Language Models to Gated Recurrent Structures", ICML 2025):

      o_t = softmax_win(s_t) V_win + alpha_h phi(q_t) M_t

  alpha_h starts at 0: the converted model is then the pretrained one restricted to the window, exact on
  the last W tokens, the older ones left out. At 1, the memory's read would come on top at the scale of a
  core without a window, while the window's softmax already carries a whole output's magnitude: on the
  demo's teacher, DFW with W = 16 measured val ppl 1,710 as converted with alpha_h = 1, worse than DFW
  without a window (824); at 0, 126.4 (the teacher: 94.3; docs/hybrids.md). `transfer.calibrate` fits
  alpha_h by least squares, and training moves it from the first step (its gradient, the read against the
  output's gradient, is not zero); the memory's own parameters learn as soon as alpha_h is off 0.

Either way, for t < W the memory is exactly zero and the output is exactly softmax attention: a model right
after conversion is the pretrained one on contexts of up to W tokens.

Padding: a pad is neither a key of the window nor written to the memory, and does not count as one of the W
tokens, so a row with pads anywhere gives, at its real tokens, what it gives alone. The parallel form gets
there by moving every pad (and every empty slot of the buffer it continues from) to the front of its row, a
stable permutation after which "the last W real tokens" is a band of W positions and "W real tokens later" a
shift by W; the outputs are permuted back. Without pads and without a state (training) there is nothing to
move. A pad's own output is finite and meaningless (it attends to itself alone).

The decode state (`WindowState`) is the fast-weight state and a ring buffer of the last W tokens: the r-th
real token of a row sits in slot r mod W, and a counter of real tokens per row says which slots hold one.
Its size is fixed and the decode step writes it in place, without a host synchronisation (CUDA graphs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class WindowState(NamedTuple):
    """The state of a fast-weight core with a window; every tensor has the batch first
    (`dfw.attention.state`).

    Slots are laid out as a ring: the r-th real token of a row (r = 0, 1, ...) sits in slot r mod W, and the
    slots that hold a token are those below `count` (all of them once seen >= W).
    """

    fast_weights: (
        Tensor  # (B, H, m, Dv): the memory of the tokens before the window (Dv = D + 1 with a denominator)
    )
    keys: Tensor  # (B, W, H, D): the window's keys, as the layer's q, k, v projection gives them
    values: Tensor  # (B, W, H, Dv): their values (with a denominator, its column of ones)
    write_keys: Tensor  # (B, W, H, m): their key features as the update rule writes them to the memory
    write_strength: Tensor  # (B, W, H, 1): the delta rule's beta; (B, W, H, 0) for the other rules
    seen: Tensor  # (B,) int64: real tokens seen


def gather_time(x: Tensor, index: Tensor) -> Tensor:
    """x [B, L, *] at positions index [B, L'] along dim 1: [B, L', *]."""
    shape = index.shape + (1,) * (x.dim() - 2)
    return x.gather(1, index.view(shape).expand(*index.shape, *x.shape[2:]))


def front_padded_last(x: Tensor, window: int) -> Tensor:
    """The last `window` positions of x [B, L, *], zero-padded at the front when L < window: [B, W, *]."""
    L = x.shape[1]
    if L >= window:
        return x[:, L - window :]
    return F.pad(x, (0, 0) * (x.dim() - 2) + (window - L, 0))


def delayed(x: Tensor, window: int) -> Tensor:
    """x [B, L, *] delayed by `window` positions along dim 1 (zeros for the first ones)."""
    L = x.shape[1]
    return F.pad(x, (0, 0) * (x.dim() - 2) + (window, 0))[:, :L]


def ring_to_chronological(state: WindowState) -> tuple[list[Tensor], Tensor]:
    """The buffer's tensors (keys, values, write_keys, write_strength) oldest slot first, [B, W, *] each, and
    which of those hold a token [B, W] (the empty ones come first)."""
    W = state.keys.shape[1]
    offsets = torch.arange(W, device=state.seen.device)  # (W,)
    index = (state.seen[:, None] + offsets) % W  # (B, W): oldest first
    valid = state.seen[:, None] + offsets >= W  # (B, W)
    parts = [
        gather_time(t, index) for t in (state.keys, state.values, state.write_keys, state.write_strength)
    ]
    return parts, valid


def chronological_to_ring(parts: list[Tensor], valid: Tensor, count: Tensor) -> list[Tensor]:
    """The inverse of `ring_to_chronological` for the last W tokens [B, W, *] (oldest first) of a row that has
    seen `count` [B] real tokens: slot s holds chronological position (s - count) mod W; empty slots zero."""
    W = valid.shape[1]
    index = (torch.arange(W, device=count.device) - count[:, None]) % W  # (B, W)
    keep = valid[:, :, None, None]
    return [gather_time(torch.where(keep, t, 0.0), index) for t in parts]


def window_band(window: int, block: int, key_blocks: int, device: torch.device) -> Tensor:
    """[block, key_blocks * block] bool: query a of a block sees key c of its key span when 0 <= i - j < W."""
    a = torch.arange(block, device=device)[:, None]
    c = torch.arange(key_blocks * block, device=device)[None, :]
    distance = a + (key_blocks - 1) * block - c  # i - j
    return (distance >= 0) & (distance < window)


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    scale: float,
    valid: Tensor | None = None,
    with_lse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Causal softmax attention over the last `window` positions, computed in blocks: O(L W), not O(L^2).

    Args:
        q, k: [B, L, H, D]; v: [B, L, H, Dv].
        window: W >= 1; query i sees keys i - W + 1 .. i.
        scale: the score scale (GPT-2's `scaling`).
        valid: [B, L] bool, False where a position is not a key (a pad); such a query sees itself only.
        with_lse: also return the log-sum-exp of each query's scores.
    Returns:
        (o [B, L, H, Dv], lse [B, L, H] or None).

    Queries come in blocks of b = min(W, 64) positions, each against the keys of its own block and the
    ceil((W - 1) / b) blocks before it, masked to the band. Without `with_lse` the blocks go through
    `scaled_dot_product_attention` (its fused kernels where the device has them); with it, through the
    scores written out, which the shared normaliser needs.
    """
    B, L, H, D = q.shape
    block = min(window, 64)
    key_blocks = 1 + math.ceil((window - 1) / block)
    blocks = math.ceil(L / block)
    end, front = blocks * block - L, (key_blocks - 1) * block
    span = key_blocks * block

    def key_spans(t: Tensor) -> Tensor:  # [B, L, H, E] -> [B, H, n, span, E]
        t = F.pad(t, (0, 0, 0, 0, front, end)).transpose(1, 2)  # (B, H, front + n b, E)
        return t.unfold(2, span, block).transpose(-1, -2)  # (B, H, n, span, E)

    qb = F.pad(q, (0, 0, 0, 0, 0, end)).transpose(1, 2).reshape(B, H, blocks, block, D)  # (B, H, n, b, D)
    kb, vb = key_spans(k), key_spans(v)  # (B, H, n, span, D), (B, H, n, span, Dv)
    band = window_band(window, block, key_blocks, q.device)  # (b, span)
    real = torch.ones(B, L, dtype=torch.bool, device=q.device) if valid is None else valid
    keys = F.pad(real, (front, end), value=False).unfold(1, span, block)  # (B, n, span)
    diagonal = torch.zeros_like(band)
    diagonal[:, front : front + block] = torch.eye(block, dtype=torch.bool, device=q.device)
    allowed = band & (keys[:, None, :, None, :] | diagonal)  # (B, 1, n, b, span)
    if not with_lse:
        # As 4D batches of blocks [B, H n, *], the layout SDPA's fused kernels take.
        flat = lambda t: t.reshape(B, H * blocks, *t.shape[-2:])
        mask = flat(allowed.expand(B, H, blocks, block, span))  # (B, H n, b, span)
        o = F.scaled_dot_product_attention(flat(qb), flat(kb), flat(vb), attn_mask=mask, scale=scale)
        lse = None
    else:
        # In float32 (float64 for float64 inputs), autocast off: the log-sum-exp meets the memory's sums.
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            scores = (qb.to(dtype) @ kb.to(dtype).transpose(-1, -2)) * scale  # (B, H, n, b, span)
            scores = scores.masked_fill(~allowed, float("-inf"))
            lse = scores.logsumexp(-1, keepdim=True)  # (B, H, n, b, 1)
            o = torch.exp(scores - lse) @ vb.to(dtype)  # (B, H, n, b, Dv)
        lse = lse.reshape(B, H, blocks * block)[:, :, :L].transpose(1, 2)  # (B, L, H)
    o = o.reshape(B, H, blocks * block, -1)[:, :, :L].transpose(1, 2)  # (B, L, H, Dv)
    return o, lse


def shared_normaliser(o_window: Tensor, lse: Tensor, read: Tensor) -> Tensor:
    """LoLCATs' combination: (e^lse o_win + phi(q) M) / (e^lse + phi(q) z), from read = [phi(q) M, phi(q) z].

    o_window [B, T, H, D], lse [B, T, H], read [B, T, H, D + 1]. The memory's share of the denominator is
    taken as 0 where phi(q) z <= 0 (no memory yet, or a kernel with signed features), so that the window alone
    gives o_win exactly; the where-inside-where keeps that branch's gradient finite.
    """
    numerator, denominator = read[..., :-1], read[..., -1]  # (B, T, H, D), (B, T, H)
    positive = denominator > 0
    log_memory = torch.where(
        positive, torch.where(positive, denominator, 1.0).log(), float("-inf")
    )  # (B, T, H)
    log_z = torch.logaddexp(lse, log_memory)  # (B, T, H)
    return o_window * torch.exp(lse - log_z)[..., None] + numerator * torch.exp(-log_z)[..., None]
