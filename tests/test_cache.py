"""RecurrentCache: generation with the recurrent state gives what recomputing the whole sequence gives, and
padding (anywhere, with or without a cache) gives what each row gives alone.

Every preset in conf/attention/ is tested (new ones are picked up by name), on a tiny GPT-2 in float64
whose parameters are all perturbed, so decay gates and feature maps depend on the data. Softmax is GPT-2's
own attention (not converted), with transformers' KV cache entries inside a RecurrentCache.
"""

from __future__ import annotations

import pytest
import torch
from dfw_kernels.testing import relative_rms_error
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from dfw.attention.state import RecurrentLayer, state_tensors
from dfw.cache import RecurrentCache, cache_bytes
from dfw.model import core_factory
from dfw.surgery import convert_attention
from tests.conftest import CONF

PRESETS = sorted(path.stem for path in (CONF / "attention").glob("*.yaml"))
RECURRENT = [name for name in PRESETS if name != "softmax"]
VOCAB, PAD = 97, 0


def tiny_model(
    preset: str, attn_implementation: str = "sdpa", dtype=torch.float64, window: int | None = None
) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=PAD,
        eos_token_id=PAD,
        pad_token_id=PAD,
    )
    config._attn_implementation = attn_implementation
    net = GPT2LMHeadModel(config)
    attention = OmegaConf.load(CONF / "attention" / f"{preset}.yaml")
    if "chunk_size" in attention:
        attention.chunk_size = 16  # the sequences here are short: less padding inside the chunkwise forms
    if window is not None:
        attention.window = window
    convert_attention(net, core_factory(attention))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.to(dtype).eval()


def greedy(net, input_ids, **kwargs):
    n = 8
    return net.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_generation_matches_recomputing_without_cache(preset):
    net = tiny_model(preset)
    prompt = torch.randint(1, VOCAB, (3, 9))
    cached = greedy(net, prompt, cache=RecurrentCache(net))
    recomputed = greedy(net, prompt, use_cache=False)
    assert cached.shape == (3, 17)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("preset", PRESETS)
def test_logits_of_prefill_chunks_and_single_tokens_match_the_full_forward(preset):
    net = tiny_model(preset)
    ids = torch.randint(1, VOCAB, (2, 20))
    full = net(ids, use_cache=False).logits  # (B, T, V)
    cache = RecurrentCache(net)
    pieces = [net(ids[:, :7], cache=cache).logits, net(ids[:, 7:12], cache=cache).logits]  # two prefill calls
    pieces += [net(ids[:, t : t + 1], cache=cache).logits for t in range(12, 20)]  # then one token at a time
    assert cache.get_seq_length() == 20
    # float64: the chunkwise forms agree with the loop to ~1e-15 (decay) and ~1e-9 (delta's triangular
    # solve); a state lost or applied twice shows up as ~1e-2.
    assert relative_rms_error(torch.cat(pieces, dim=1), full) < 1e-7


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("preset", PRESETS)
def test_left_padded_batch_matches_each_prompt_alone(preset, attn_implementation):
    if attn_implementation == "eager" and preset != "decay":
        pytest.skip(
            "the mask format depends on the attention implementation, not on the preset: decay covers it"
        )
    net = tiny_model(preset, attn_implementation)
    lengths = [5, 1, 8]
    prompts = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    T = max(lengths)
    input_ids = torch.full((len(prompts), T), PAD)
    attention_mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, T - len(prompt) :] = prompt
        attention_mask[row, T - len(prompt) :] = 1
    batched = greedy(net, input_ids, attention_mask=attention_mask, cache=RecurrentCache(net))
    for row, prompt in enumerate(prompts):
        alone = greedy(net, prompt[None], cache=RecurrentCache(net))  # (equal to recomputing: tested above)
        assert torch.equal(batched[row, T:], alone[0, len(prompt) :]), (
            f"row {row} (prompt of {len(prompt)} tokens)"
        )


def padded(prompts: list[torch.Tensor], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), [B, T] each, the prompts padded on `side` ("middle": pads inside too)."""
    T = max(len(p) for p in prompts) + (3 if side == "middle" else 0)
    input_ids = torch.full((len(prompts), T), PAD)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        if side == "left":
            places = torch.arange(T - n, T)
        elif side == "right":
            places = torch.arange(n)
        else:  # a pad before, two inside, the rest after
            places = torch.cat([torch.arange(1, 1 + n // 2), torch.arange(3 + n // 2, 3 + n)])
        input_ids[row, places], mask[row, places] = prompt, 1
    return input_ids, mask


@pytest.mark.parametrize("side", ["left", "right", "middle"])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("preset", PRESETS)
def test_padded_rows_give_the_logits_of_each_row_alone(preset, use_cache, side):
    """Pads contribute nothing, wherever they are, with a RecurrentCache or without any cache
    (use_cache=False, the training and evaluation path): the real tokens' logits equal the row's alone."""
    net = tiny_model(preset)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (5, 9, 2)]
    input_ids, mask = padded(prompts, side)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # each row's real tokens at 0, 1, ...: as generate does
    kwargs = dict(cache=RecurrentCache(net)) if use_cache else dict(use_cache=False)
    logits = net(input_ids, attention_mask=mask, position_ids=positions, **kwargs).logits  # (B, T, V)
    for row, prompt in enumerate(prompts):
        alone = net(prompt[None], use_cache=False).logits[0]  # (n, V)
        assert relative_rms_error(logits[row, mask[row].bool()], alone) < 1e-9, f"row {row}"


def test_a_padded_prompt_leaves_each_rows_state_as_alone():
    net = tiny_model("decay")
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (3, 7)]
    input_ids, mask = padded(prompts)
    cache = RecurrentCache(net)
    net(input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), cache=cache)
    for row, prompt in enumerate(prompts):
        alone = RecurrentCache(net)
        net(prompt[None], cache=alone)
        for layer, layer_alone in zip(cache.layers, alone.layers, strict=True):
            assert relative_rms_error(layer.state[row], layer_alone.state[0]) < 1e-12


@pytest.mark.parametrize("preset", RECURRENT)
def test_state_memory_does_not_grow_with_the_context(preset):
    net = tiny_model(preset, dtype=torch.float32)
    cache = RecurrentCache(net)
    net(torch.randint(1, VOCAB, (3, 8)), cache=cache)
    after_prompt = cache.state_bytes()
    addresses = [layer.state.data_ptr() for layer in cache.layers]
    net(torch.randint(1, VOCAB, (3, 30)), cache=cache)  # 30 more prompt tokens
    for _ in range(10):  # 10 decoded tokens
        net(torch.randint(1, VOCAB, (3, 1)), cache=cache)
    assert cache.get_seq_length() == 8 + 30 + 10
    assert cache.state_bytes() == after_prompt == cache_bytes(cache) > 0
    # Updated in place, so a captured decode step (CUDA graph) keeps reading the live state.
    assert [layer.state.data_ptr() for layer in cache.layers] == addresses
    # What the cores say they keep, with the states in float32.
    assert after_prompt == sum(block.attn.core.state_bytes(3, 48) for block in net.transformer.h)


def test_softmax_state_is_the_kv_cache_and_grows():
    net = tiny_model("softmax", dtype=torch.float32)
    cache = RecurrentCache(net)
    assert not any(isinstance(layer, RecurrentLayer) for layer in cache.layers)  # transformers' KV entries
    net(torch.randint(1, VOCAB, (1, 8)), cache=cache)
    before = cache.state_bytes()
    net(torch.randint(1, VOCAB, (1, 4)), cache=cache)
    per_token = 2 * 2 * 32 * 4  # keys and values, 2 layers, n_embd 32, float32
    assert before == 8 * per_token and cache.state_bytes() == 12 * per_token == cache_bytes(cache)


def test_beam_search_reorders_the_state_in_place():
    net = tiny_model("decay")
    prompt = torch.randint(1, VOCAB, (2, 5))
    cache = RecurrentCache(net)
    cached = greedy(net, prompt, num_beams=2, cache=cache)
    recomputed = greedy(net, prompt, num_beams=2, use_cache=False)
    assert torch.equal(cached, recomputed)
    # The reorder writes the states in place: 4 rows (2 prompts x 2 beams), at the addresses of the prefill.
    state = cache.layers[0].state
    addresses = [layer.state.data_ptr() for layer in cache.layers]
    cache.reorder_cache(torch.tensor([1, 0, 3, 2]))
    assert [layer.state.data_ptr() for layer in cache.layers] == addresses and state.shape[0] == 4


def test_generate_without_a_recurrent_cache_fails_loudly_on_a_model_converted_in_place():
    # A GPT2LMHeadModel converted by dfw.surgery: transformers makes a DynamicCache, which converted layers
    # never fill, so every new token would see no past. That must be an error, not silently wrong text (a
    # DFWForCausalLM supplies its RecurrentCache: tests/test_generation_tools.py).
    net = tiny_model("decay")
    with pytest.raises(RuntimeError, match="RecurrentCache"):
        greedy(net, torch.randint(1, VOCAB, (1, 5)))


def test_each_new_token_is_decoded_by_the_cores_step_in_the_cached_state():
    # `core.step(q, k, v, x, state) -> o`, updating the state in place, is the core's decode step (the
    # kernel's, dfw_kernels.decay_fast_weights_step); the layer runs it for every generated token, in the
    # state the core allocated at the prefill. A step of the recurrent form stands in: a wrong state shows.
    net = tiny_model("decay")
    calls = []
    for block in net.transformer.h:

        def step(q, k, v, x, state, token_mask=None, core=block.attn.core):
            calls.append(state.data_ptr())
            o, new_state = core.recurrent(q, k, v, x, state, token_mask)
            state.copy_(new_state)
            return o

        block.attn.core.step = step
    prompt = torch.randint(1, VOCAB, (2, 6))
    cache = RecurrentCache(net)
    cached = greedy(net, prompt, cache=cache)
    assert len(calls) == 2 * 7  # 2 layers, every generated token after the first (which ends the prefill)
    assert set(calls) == {layer.state.data_ptr() for layer in cache.layers}
    assert torch.equal(cached, greedy(net, prompt, use_cache=False))


# attention.window=W (dfw/attention/window.py): the cache holds each layer's ring buffer of the last W tokens.
WINDOW = 4  # shorter than the prompts and the generated text, so tokens leave the window for the memory


@pytest.mark.parametrize("preset", RECURRENT)
def test_greedy_generation_with_a_window_matches_recomputing_and_each_left_padded_row_alone(preset):
    net = tiny_model(preset, window=WINDOW)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (3, 9)]
    input_ids, mask = padded(prompts)
    cached = greedy(net, input_ids, attention_mask=mask, cache=RecurrentCache(net))
    recomputed = greedy(net, input_ids, attention_mask=mask, use_cache=False)
    assert cached.shape == (2, 9 + 8) and torch.equal(cached, recomputed)
    for row, prompt in enumerate(prompts):
        alone = greedy(net, prompt[None], cache=RecurrentCache(net))
        assert torch.equal(cached[row, 9:], alone[0, len(prompt) :]), f"row {row}"


@pytest.mark.parametrize("preset", RECURRENT)
def test_with_a_window_prefill_chunks_and_single_tokens_give_the_full_forwards_logits(preset):
    net = tiny_model(preset, window=WINDOW)
    ids = torch.randint(1, VOCAB, (2, 20))
    full = net(ids, use_cache=False).logits  # (B, T, V)
    cache = RecurrentCache(net)
    pieces = [net(ids[:, :3], cache=cache).logits, net(ids[:, 3:12], cache=cache).logits]
    pieces += [net(ids[:, t : t + 1], cache=cache).logits for t in range(12, 20)]
    assert relative_rms_error(torch.cat(pieces, dim=1), full) < 1e-7


def test_with_a_window_the_state_has_a_fixed_size_and_fixed_addresses():
    net = tiny_model("decay", dtype=torch.float32, window=WINDOW)
    cache = RecurrentCache(net)
    net(torch.randint(1, VOCAB, (3, 8)), cache=cache)
    after_prompt, addresses = cache.state_bytes(), [t.data_ptr() for t in cache.state_tensors()]
    net(torch.randint(1, VOCAB, (3, 30)), cache=cache)
    for _ in range(10):
        net(torch.randint(1, VOCAB, (3, 1)), cache=cache)
    assert (
        cache.state_bytes()
        == after_prompt
        == sum(block.attn.core.state_bytes(3, 48) for block in net.transformer.h)
    )
    assert [t.data_ptr() for t in cache.state_tensors()] == addresses
    assert (
        len(state_tensors(cache.layers[0].state)) == 6
    )  # fast weights, keys, values, write keys and strength, count
