"""Feature maps phi: per-head queries and keys [B, T, H, D] -> features [B, T, H, m].

One phi is shared between queries and keys within a head, as in the kernel view of attention
(phi(q) . phi(k) replaces exp(q . k / sqrt(D))). `FEATURE_MAPS` is the registry that
`attention.feature_map` names: a subclass of `FeatureMap` with a `name` registers itself
(`dfw.attention.registry`, as update rules and normalisations do). Every map is built from
(num_heads, head_dim, state_size, options), where `state_size` None means the map's natural size and
`options` holds the map-specific settings of the attention config (each map reads its own and ignores
the rest); the map's `state_size` is then m, the size of its features and of the state's key side.

| name       | phi(x)                                                | paper                          |
|------------|-------------------------------------------------------|--------------------------------|
| identity   | x                                                     | -                              |
| linear     | W_h x, learned W_h in R^{m x D}                       | DFW (Mao 2022)                 |
| elu        | elu(x) + 1                                            | Katharopoulos et al. 2020      |
| relu_mlp   | relu(W_h x + b_h), learned                            | T2R (Kasai et al. 2021)        |
| favor      | exp(w_i . x' - |x'|^2 / 2) / sqrt(m), x' = x D^-1/4   | Performer (Choromanski 2021)   |
| rff        | [sin(w_i . s*x^), cos(w_i . s*x^)] / sqrt(m/2)        | RFA (Peng et al. 2021)         |
| dpfp       | [r_i r_{i+j}], r = [relu(x), relu(-x)], j = 1..nu     | Schlag et al. 2021             |
| hedgehog   | [softmax(W_h x), softmax(-W_h x)], learned W_h        | Hedgehog (Zhang et al. 2024)   |
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Registered

FEATURE_MAPS: dict[str, type[FeatureMap]] = {}


class FeatureMap(nn.Module, Registered):
    """Base class. Its capabilities, which decide the normalisations it works with (checked when a core is
    built):

    nonnegative: every feature is >= 0, so sums of features are safe to divide by (`normalization=sum`).
    positive_kernel: phi(q) . phi(k) estimates a positive kernel, so a denominator phi(q) . z_t is (close
        to) positive (`normalization=denominator`): every non-negative map, and RFA's signed random
        Fourier features, clamped as in RFA.
    needs_normalization: features are divided by a per-query factor for numerical range, which only a
        normalisation cancels (`normalization=none` is refused).
    scalable: `scale_features(factor)` multiplies head h's features by factor[h] exactly, through the
        map's own parameters (transfer.calibrate).
    """

    registry: ClassVar[dict[str, type[FeatureMap]]] = FEATURE_MAPS
    nonnegative: ClassVar[bool] = False
    positive_kernel: ClassVar[bool] = False
    needs_normalization: ClassVar[bool] = False
    scalable: ClassVar[bool] = False

    def __init__(self, num_heads: int, head_dim: int, state_size: int | None, options: dict[str, Any]):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.state_size = head_dim if state_size is None else state_size

    def forward(self, x: Tensor, is_query: bool = False) -> Tensor:
        raise NotImplementedError

    def training_call(self) -> None:
        """Called once per training-mode call of the attention core (random features redraw here)."""

    @torch.no_grad()
    def scale_features(self, factor: Tensor) -> None:
        """Multiply head h's features by factor[h] [H] from now on (only where `scalable`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be rescaled through its parameters")


def per_head_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [B, T, H, D] times each head's own matrix, weight [H, n, D]: [B, T, H, n] (einsum "bthd,hnd->bthn").

    One batched matmul over heads, as einsum itself computes it, in half of einsum's operator calls: at decode
    (T = 1) their overhead, not the arithmetic, is the cost.
    """
    B, T, H, D = x.shape
    out = torch.bmm(x.permute(2, 0, 1, 3).reshape(H, B * T, D), weight.mT)  # (H, B*T, n)
    return out.view(H, B, T, weight.shape[1]).permute(1, 2, 0, 3)  # (B, T, H, n)


def _require_size(name: str, natural: int, state_size: int | None, how: str) -> int:
    if state_size is not None and state_size != natural:
        raise ValueError(
            f"feature_map={name} has state size {how} = {natural}, got state_size={state_size}; "
            f"set attention.state_size=null (or {natural})"
        )
    return natural


class IdentityFeatureMap(FeatureMap):
    """phi(x) = x: no parameters; the state size is the head size."""

    name = "identity"

    def __init__(self, num_heads, head_dim, state_size, options):
        super().__init__(num_heads, head_dim, state_size, options)
        self.state_size = _require_size("identity", head_dim, state_size, "head size")

    def forward(self, x: Tensor, is_query: bool = False) -> Tensor:
        return x


class LinearFeatureMap(FeatureMap):
    """phi(x) = W_h x with a learned W_h in R^{m x D} per head (DFW, Mao 2022).

    Conversion: the identity when m == D, so the converted layer starts from the pretrained
    q . k; otherwise a random semi-orthogonal W_h (orthonormal rows or columns), which keeps
    inner products as well as a map of that size can.
    """

    name = "linear"
    scalable = True

    def __init__(self, num_heads, head_dim, state_size, options):
        super().__init__(num_heads, head_dim, state_size, options)
        weight = torch.empty(num_heads, self.state_size, head_dim)  # (H, m, D)
        for h in range(num_heads):
            if self.state_size == head_dim:
                nn.init.eye_(weight[h])
            else:
                nn.init.orthogonal_(weight[h])
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor, is_query: bool = False) -> Tensor:
        return per_head_linear(x, self.weight.to(x.dtype))  # (B, T, H, m)

    @torch.no_grad()
    def scale_features(self, factor: Tensor) -> None:
        self.weight.mul_(factor.to(self.weight.dtype)[:, None, None])  # (H, m, D)


class EluFeatureMap(FeatureMap):
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al. 2020): no parameters; state size = head size."""

    name = "elu"

    nonnegative = True
    positive_kernel = True

    def __init__(self, num_heads, head_dim, state_size, options):
        super().__init__(num_heads, head_dim, state_size, options)
        self.state_size = _require_size("elu", head_dim, state_size, "head size")

    def forward(self, x: Tensor, is_query: bool = False) -> Tensor:
        return F.elu(x) + 1.0


class ReluMLPFeatureMap(FeatureMap):
    """phi(x) = relu(W_h x + b_h), W_h in R^{m x D}, one per head, shared by q and k (T2R, Kasai et al. 2021).

    Conversion: as in T2R, a random single-layer MLP (PyTorch's nn.Linear initialisation, per head);
    no choice of it reproduces exp(q . k), so fine-tuning starts away from the pretrained attention.
    """

    name = "relu_mlp"

    nonnegative = True
    positive_kernel = True

    def __init__(self, num_heads, head_dim, state_size, options):
        super().__init__(num_heads, head_dim, state_size, options)
        bound = 1.0 / math.sqrt(head_dim)  # nn.Linear's default bounds for fan_in = D
        self.weight = nn.Parameter(torch.empty(num_heads, self.state_size, head_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_heads, self.state_size).uniform_(-bound, bound))

    def forward(self, x: Tensor, is_query: bool = False) -> Tensor:
        return F.relu(per_head_linear(x, self.weight.to(x.dtype)) + self.bias.to(x.dtype))


class RandomFeatureMap(FeatureMap):
    """Shared machinery of random-feature maps: a persistent buffer of random directions per head,
    redrawn every `redraw_interval` training-mode calls (None: never), fixed in evaluation.

    Draw n of layer l comes from a generator seeded with (seed, layer_idx, n), so two cores built with
    the same settings hold the same features, and an exported model keeps the ones it was trained with
    (the buffer is saved in its state dict).
    """

    projection: Tensor  # (H, n, D) buffer: the random directions
    training_calls: Tensor  # () buffer: training-mode calls so far

    def __init__(self, num_heads, head_dim, state_size, options):
        super().__init__(num_heads, head_dim, state_size, options)
        redraw_interval = options.get("redraw_interval")
        if redraw_interval is not None and (not isinstance(redraw_interval, int) or redraw_interval <= 0):
            raise ValueError(
                f"attention.redraw_interval must be a positive integer or null, got {redraw_interval!r}"
            )
        self.redraw_interval = redraw_interval
        self.seed = int(options.get("seed", 0))
        self.layer_idx = int(options.get("layer_idx", 0))
        # The count lives in a buffer (saved with the model, so a resumed run redraws on schedule) and
        # in a Python int (read every call without a device sync).
        self.calls = 0
        self.register_buffer("training_calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("projection", self.draw(0))  # (H, n, D)
        self.register_load_state_dict_post_hook(
            lambda module, _: setattr(module, "calls", int(module.training_calls))
        )

    def sample(self, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def draw(self, index: int) -> Tensor:
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.layer_idx) * 1_000_003 + index
        )
        return self.sample(generator)

    def training_call(self) -> None:
        if self.redraw_interval is not None and self.calls > 0 and self.calls % self.redraw_interval == 0:
            self.projection.copy_(self.draw(self.calls // self.redraw_interval))
        self.calls += 1
        self.training_calls.fill_(self.calls)

    def extra_repr(self) -> str:
        return f"size={self.state_size}, redraw_interval={self.redraw_interval}, seed={self.seed}"


class FavorFeatureMap(RandomFeatureMap):
    """Performer's FAVOR+ (Choromanski et al. 2021): positive orthogonal random features.

        phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),   x' = x / D^{1/4},
        E[phi(q) . phi(k)] = exp(q . k / sqrt(D))

    W [m, D] per head: blocks of D orthogonal rows (QR of a Gaussian), each row rescaled to the norm of
    a Gaussian vector (chi-distributed), as in the paper. No learned parameters.

    Range: a key feature is at most exp(|w|^2 / 2) (the exponent w.x' - |x'|^2/2 peaks at x' = w), so
    keys need no stabiliser. A query's features are divided by exp(max_i of its exponents), a
    per-query factor that the denominator (or sum) normalisation cancels exactly; hence favor needs one.
    """

    name = "favor"

    nonnegative = True
    positive_kernel = True
    needs_normalization = True

    def sample(self, generator: torch.Generator) -> Tensor:
        H, m, D = self.num_heads, self.state_size, self.head_dim
        blocks = []
        for _ in range(math.ceil(m / D) * H):
            q, r = torch.linalg.qr(torch.randn(D, D, generator=generator, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))  # sign fix: without it the directions are not uniform
            blocks.append(q.T)  # (D, D), orthonormal rows
        rows = torch.stack(blocks).reshape(H, -1, D)[:, :m]  # (H, m, D)
        norms = torch.randn(H, m, D, generator=generator, dtype=torch.float64).norm(dim=-1, keepdim=True)
        return (rows * norms).float()  # (H, m, D)

    def forward(self, x: Tensor, is_query: bool = False) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype) * self.head_dim**-0.25  # (B, T, H, D)
        exponent = per_head_linear(x, self.projection.to(dtype))  # (B, T, H, m)
        exponent = exponent - 0.5 * x.square().sum(-1, keepdim=True)
        if is_query:
            exponent = exponent - exponent.amax(-1, keepdim=True).detach()
        return exponent.exp() * self.state_size**-0.5


class RandomFourierFeatureMap(RandomFeatureMap):
    """RFA's random Fourier features (Peng et al. 2021) of l2-normalised inputs, with a scale s:

        phi(x) = [sin(W (s * x^)), cos(W (s * x^))] / sqrt(n),   x^ = x / |x|,   n = m / 2 rows of W ~ N(0, I)

    so that E[phi(q) . phi(k)] = exp(-|s*(q^ - k^)|^2 / 2), proportional to exp(q^ . k^) for s = 1
    (the norms are constant after normalisation, and the denominator cancels the constant).
    s [H, D] is learned when `learned_scale` (RFA's learned variance, sigma = 1/s), else fixed.
    Conversion: s = 1 (our choice; the papers do not state one). The features are signed, so the
    denominator can come near zero: as in RFA, it is clamped.
    """

    name = "rff"

    positive_kernel = True  # signed features of a positive kernel (exp(q^ . k^) up to a constant)

    def __init__(self, num_heads, head_dim, state_size, options):
        state_size = 2 * head_dim if state_size is None else state_size
        if state_size % 2:
            raise ValueError(
                f"feature_map=rff needs an even state_size (sin and cos halves), got {state_size}"
            )
        super().__init__(num_heads, head_dim, state_size, options)
        scale = torch.ones(num_heads, head_dim)  # (H, D)
        if options.get("learned_scale", True):
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    def sample(self, generator: torch.Generator) -> Tensor:
        H, n, D = self.num_heads, self.state_size // 2, self.head_dim
        return torch.randn(H, n, D, generator=generator)  # (H, m/2, D)

    def forward(self, x: Tensor, is_query: bool = False) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = F.normalize(x.to(dtype), dim=-1) * self.scale.to(dtype)  # (B, T, H, D)
        angle = per_head_linear(x, self.projection.to(dtype))  # (B, T, H, m/2)
        return torch.cat([angle.sin(), angle.cos()], dim=-1) * (self.state_size // 2) ** -0.5  # (B, T, H, m)


class DPFPFeatureMap(FeatureMap):
    """Deterministic parameter-free projection of order nu (Schlag et al. 2021), size m = 2 D nu:

    r = [relu(x), relu(-x)] in R^{2D},   phi(x) = [r * roll(r, j) for j = 1..nu]
    """

    name = "dpfp"

    nonnegative = True
    positive_kernel = True

    def __init__(self, num_heads, head_dim, state_size, options):
        super().__init__(num_heads, head_dim, state_size, options)
        order = options.get("dpfp_order", 1)
        if not isinstance(order, int) or not 1 <= order < 2 * head_dim:
            raise ValueError(
                f"attention.dpfp_order must be an integer in [1, {2 * head_dim - 1}], got {order!r}"
            )
        self.order = order
        self.state_size = _require_size(
            "dpfp", 2 * head_dim * order, state_size, "2 * head size * dpfp_order"
        )

    def forward(self, x: Tensor, is_query: bool = False) -> Tensor:
        r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)  # (B, T, H, 2D)
        return torch.cat(
            [r * r.roll(j, dims=-1) for j in range(1, self.order + 1)], dim=-1
        )  # (B, T, H, 2D nu)

    def extra_repr(self) -> str:
        return f"order={self.order}, size={self.state_size}"


class HedgehogFeatureMap(FeatureMap):
    """Hedgehog (Zhang et al., ICLR 2024): a learned linear map per head, then a softmax over each half
    of [W_h x, -W_h x]:

        phi(x) = [softmax(W_h x), softmax(-W_h x)] in R^m,   W_h in R^{m/2 x D}

    Queries and keys have their own maps (W^q_h, W^k_h), as in Hedgehog's code. The features are
    positive, so the kernel takes the attention denominator; the softmax spikes and keeps the order of
    scores, which is what lets phi(q) . phi(k) imitate exp(q . k) (the paper's "spiky, monotonic" kernel).
    Conversion: W^q_h = W^k_h = the identity when m/2 == D (Hedgehog's initialisation), else random
    semi-orthogonal. Hedgehog then trains W to match softmax attention (`transfer.loss=attention_ce`).
    """

    name = "hedgehog"

    nonnegative = True
    positive_kernel = True

    def __init__(self, num_heads, head_dim, state_size, options):
        state_size = 2 * head_dim if state_size is None else state_size
        if state_size % 2:
            raise ValueError(
                f"feature_map=hedgehog needs an even state_size ([Wx, -Wx] halves), got {state_size}"
            )
        super().__init__(num_heads, head_dim, state_size, options)
        half = self.state_size // 2
        weight = torch.empty(2, num_heads, half, head_dim)  # (query | key, H, m/2, D)
        for side in range(2):
            for h in range(num_heads):
                if half == head_dim:
                    nn.init.eye_(weight[side, h])
                else:
                    nn.init.orthogonal_(weight[side, h])
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor, is_query: bool = False) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight[0 if is_query else 1].to(dtype)  # (H, m/2, D)
        projected = per_head_linear(x.to(dtype), weight)  # (B, T, H, m/2)
        return torch.cat([projected.softmax(-1), (-projected).softmax(-1)], dim=-1)  # (B, T, H, m)

    def extra_repr(self) -> str:
        return f"size={self.state_size}"
