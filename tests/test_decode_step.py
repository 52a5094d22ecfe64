"""dfw's decode step (`dfw.cache`): the lean eager step gives the full forward's logits and states, generate
runs it for every plain decode call and the full forward for anything else, and the CUDA-graph bookkeeping
(`DecodeGraphs`: static buffers, one capture per batch size, states restored after capture, recapture when a
state is reallocated, eager fallback) holds. Capture itself needs a GPU: on a CPU an eager stand-in records
the step and "replays" it by running it again, which is what a replay must be equivalent to.
`test_cuda_graph_decoding_equals_eager` runs the real capture (`pytest -m gpu tests/test_decode_step.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from dfw_kernels.testing import relative_rms_error
from omegaconf import OmegaConf
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel

from dfw import cache as dfw_cache
from dfw.attention import SoftmaxAttention
from dfw.cache import CUDAGraphCapture, DecodeGraphs, RecurrentCache, decode_call_unsupported, decode_step
from dfw.hf import DFWForCausalLM, as_dfw_model
from dfw.model import core_factory
from dfw.surgery import convert_attention
from tests.conftest import CONF

RECURRENT = sorted(path.stem for path in (CONF / "attention").glob("*.yaml") if path.stem != "softmax")
VOCAB, PAD = 97, 0


def dfw_model(
    preset: str = "decay", device: str = "cpu", dtype=torch.float64, factory=None, window: int | None = None
) -> DFWForCausalLM:
    """A tiny converted GPT-2 as a DFWForCausalLM (what an export loads as), every parameter perturbed."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=PAD, eos_token_id=PAD
    )
    net = GPT2LMHeadModel(config)
    attention = OmegaConf.load(CONF / "attention" / f"{preset}.yaml")
    if "chunk_size" in attention:
        attention.chunk_size = 16
    if window is not None:
        attention.window = window
    convert_attention(net, factory or core_factory(attention))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if (
        factory is not None
    ):  # a model no config describes (a softmax layer kept): decoded as converted in place
        return net.to(device=device, dtype=dtype).eval()
    return as_dfw_model(net, OmegaConf.to_container(attention)).to(device=device, dtype=dtype).eval()


def left_padded(lengths=(5, 2)) -> tuple[Tensor, Tensor]:
    T = max(lengths)
    ids, mask = torch.full((len(lengths), T), PAD), torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, T - n :], mask[row, T - n :] = torch.randint(1, VOCAB, (n,)), 1
    return ids, mask


def generate(net, ids, mask, **kwargs) -> Tensor:
    with torch.no_grad():
        return net.generate(
            ids, attention_mask=mask, max_new_tokens=7, min_new_tokens=7, do_sample=False, **kwargs
        )


@pytest.mark.parametrize("preset", RECURRENT)
def test_the_lean_decode_step_gives_the_full_forwards_logits_and_states(preset):
    net = dfw_model(preset)
    ids, mask = left_padded()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    lean, full = RecurrentCache(net), RecurrentCache(net)
    with torch.no_grad():
        for cache in (lean, full):
            net(ids, attention_mask=mask, position_ids=positions, cache=cache)
        position = positions[:, -1:]
        for _ in range(5):
            token = torch.randint(1, VOCAB, (2, 1))
            position = position + 1
            expected = GPT2LMHeadModel.forward(
                net, token, cache=full, position_ids=position
            ).logits  # (B, 1, V)
            logits = decode_step(net, token, position, lean)
            assert relative_rms_error(logits, expected) < 1e-12
    assert lean.get_seq_length() == full.get_seq_length() == ids.shape[1] + 5
    for a, b in zip(lean.state_tensors(), full.state_tensors(), strict=True):
        assert relative_rms_error(a, b) < 1e-12


def test_generate_runs_the_lean_step_for_every_plain_decode_call(monkeypatch):
    net = dfw_model()
    ids, mask = left_padded()
    calls: list[int] = []
    original = dfw_cache.decode_step
    monkeypatch.setattr(dfw_cache, "decode_step", lambda *args: calls.append(1) or original(*args))
    cached = generate(net, ids, mask)
    assert len(calls) == 6  # 7 new tokens: the first from the prompt's forward, then 6 decode steps
    calls.clear()
    assert torch.equal(cached, generate(net, ids, mask, use_cache=False)) and not calls


def test_a_call_that_is_not_a_plain_decode_step_takes_the_full_forward():
    net = dfw_model()
    ids, mask = left_padded()
    cache = RecurrentCache(net)
    token = torch.randint(1, VOCAB, (2, 1))
    with torch.no_grad():
        assert (
            decode_call_unsupported(net, cache, token, None)
            == "no prompt seen yet (the first call allocates the states)"
        )
        net(ids, attention_mask=mask, cache=cache)
        one_more = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        assert decode_call_unsupported(net, cache, token, one_more, use_cache=True, logits_to_keep=1) is None
        assert decode_call_unsupported(net, None, token, one_more) == "no RecurrentCache"
        assert decode_call_unsupported(net, cache, ids, None) == "not one new token per row"
        assert decode_call_unsupported(net, cache, token, one_more, output_hidden_states=True) == (
            "input output_hidden_states is given"
        )
        padded = torch.cat([mask, torch.tensor([[1], [0]])], dim=1)
        assert decode_call_unsupported(net, cache, token, padded) == "the new token is padding in some row"
        assert decode_call_unsupported(net, cache, token, one_more[:, None, None]) == "a 4D attention mask"
        # The full forward handles what the lean step does not: a padded new token changes no state.
        before = [t.clone() for t in cache.state_tensors()]
        net(token, attention_mask=padded, cache=cache)
        assert torch.equal(cache.state_tensors()[0][1], before[0][1]) and not torch.equal(
            cache.state_tensors()[0][0], before[0][0]
        )
    assert decode_call_unsupported(net, cache, token, None) == "training mode or gradients enabled"
    assert decode_call_unsupported(net.train(), cache, token, None) == "training mode or gradients enabled"


def test_a_model_with_a_softmax_layer_gets_a_kv_cache_entry_for_it_and_the_full_forward():
    """One layer kept softmax (as the hybrid conversion will): that layer's entry is transformers' KV cache,
    which grows, so there is no static-shape decode step, and generation still equals recomputing."""
    decay = core_factory(OmegaConf.merge(OmegaConf.load(CONF / "attention/decay.yaml"), {"chunk_size": 16}))
    factory = lambda layer_idx, **sizes: (SoftmaxAttention if layer_idx == 0 else decay)(
        layer_idx=layer_idx, **sizes
    )
    net = dfw_model(factory=factory)
    cache = RecurrentCache(net)
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicLayer", "RecurrentLayer"]
    ids, mask = left_padded()
    cached = generate(net, ids, mask, cache=cache)
    assert torch.equal(cached, generate(net, ids, mask, use_cache=False))
    assert (
        decode_call_unsupported(net, cache, ids[:, :1], None)
        == "a layer keeps softmax attention (its KV cache grows)"
    )
    assert cache.layers[0].get_seq_length() == cache.layers[1].get_seq_length() == cached.shape[1] - 1


class EagerStandIn:
    """A GraphCapture for the CPU: "capture" runs the step once (as the warm-up and capture runs do, changing
    the states) and keeps its output tensor; "replay" runs the step again and writes that same tensor, as a
    replay writes the captured output buffer."""

    def __init__(self, fail: bool = False):
        self.fail, self.captured = fail, 0

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def capture(self, step: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        output = step()
        self.captured += 1
        return (lambda: output.copy_(step())), output


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_graph_replays_give_the_eager_tokens(num_beams, window):
    net = dfw_model(window=window)
    ids, mask = left_padded()
    eager = generate(net, ids, mask, num_beams=num_beams, cache=RecurrentCache(net, cuda_graph=False))
    cache = RecurrentCache(net)
    cache.graphs = graphs = DecodeGraphs(EagerStandIn())
    replayed = generate(net, ids, mask, num_beams=num_beams, cache=cache)
    # Equal tokens: the capture's own runs left the states as they were, and each replay counted its token.
    assert torch.equal(replayed, eager)
    assert (
        graphs.captures == 1 and graphs.replays == 6
    )  # one batch size; beam search reorders states in place
    assert cache.get_seq_length() == replayed.shape[1] - 1
    step = graphs.steps[ids.shape[0] * num_beams]
    assert step.addresses == tuple(t.data_ptr() for t in cache.state_tensors())


def test_a_new_batch_size_or_reallocated_states_capture_again():
    net = dfw_model()
    ids, mask = left_padded((4, 4, 3))
    cache = RecurrentCache(net)
    cache.graphs = graphs = DecodeGraphs(EagerStandIn())
    reference = RecurrentCache(net, cuda_graph=False)
    with torch.no_grad():
        for c in (cache, reference):
            net(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), cache=c)

        def step(token: Tensor, position: int) -> None:
            positions = torch.full((token.shape[0], 1), position)
            logits = net(token, cache=cache, position_ids=positions).logits
            expected = net(token, cache=reference, position_ids=positions).logits
            assert relative_rms_error(logits, expected) < 1e-12

        step(torch.randint(1, VOCAB, (3, 1)), 4)
        step(torch.randint(1, VOCAB, (3, 1)), 5)
        assert graphs.captures == 1 and graphs.replays == 2
        for c in (cache, reference):
            c.batch_select_indices(torch.tensor([0, 2]))  # rows dropped: new, smaller state tensors
        step(torch.randint(1, VOCAB, (2, 1)), 6)
        assert graphs.captures == 2 and set(graphs.steps) == {3, 2}


def test_a_capture_that_fails_decodes_eagerly_and_says_why():
    net = dfw_model()
    ids, mask = left_padded()
    cache = RecurrentCache(net)
    cache.graphs = graphs = DecodeGraphs(EagerStandIn(fail=True))
    assert torch.equal(generate(net, ids, mask, cache=cache), generate(net, ids, mask, use_cache=False))
    assert (
        graphs.replays == 0
        and "capture failed (RuntimeError: operation not permitted" in graphs.fallback_reason
    )


def test_on_a_cpu_the_default_cache_decodes_eagerly():
    net = dfw_model()
    cache = RecurrentCache(net)
    assert isinstance(cache.graphs.capture, CUDAGraphCapture)
    generate(net, *left_padded(), cache=cache)
    assert cache.graphs.replays == 0 and cache.graphs.fallback_reason == "the model runs on cpu, not CUDA"
    assert RecurrentCache(net, cuda_graph=False).graphs is None


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"
)
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("preset", ["decay", "linear"])
def test_cuda_graph_decoding_equals_eager(preset, window):
    """The real capture: generate with the decode step replayed from a CUDA graph gives the eager tokens."""
    net = dfw_model(preset, device="cuda", dtype=torch.float32, window=window)
    ids, mask = (t.cuda() for t in left_padded((9, 3)))
    eager = generate(net, ids, mask, cache=RecurrentCache(net, cuda_graph=False))
    cache = RecurrentCache(net)
    replayed = generate(net, ids, mask, cache=cache)
    assert cache.graphs.fallback_reason is None, cache.graphs.fallback_reason
    assert cache.graphs.captures == 1 and cache.graphs.replays == 6
    assert torch.equal(replayed, eager)
