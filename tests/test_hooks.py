"""The one hook mechanism: scopes under left padding and KV cache, batching, removal, intervention maths."""

from __future__ import annotations

import pytest
import torch

import personascope as ps
from personascope.hooks import HookManager, TokenContext
from personascope.model import decoder_layers, hidden_size

from .conftest import left_padded

PROMPTS = [[5, 17, 3, 9, 22, 40], [7, 8], [11, 12, 13, 14]]


def _vector(model, seed=1, scale=3.0):
    torch.manual_seed(seed)
    n = len(decoder_layers(model))
    return torch.randn(n + 1, hidden_size(model)) * scale


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _record(model, layer):
    """A test observer at `layer`: every call's hidden state and token context."""
    seen = []

    def op(hidden, tokens: TokenContext):
        seen.append((hidden.detach().clone(), tokens))

    manager = HookManager.of(model)
    key = manager.add(layer, op)
    return seen, lambda: manager.remove(key)


@pytest.mark.parametrize("scope", ["response", "all"])
def test_kv_cached_generate_equals_teacher_forced_pass(tiny_any, scope):
    model = tiny_any
    ids, mask = left_padded(PROMPTS)
    vec = _vector(model)
    layer = 2
    steps = 6
    with ps.steer(model, vec, layer, coef=4.0, scope=scope), torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
    cached = torch.stack(out.logits, dim=1)  # [B, steps, V]
    full_mask = torch.cat([mask, torch.ones(len(PROMPTS), steps, dtype=torch.long)], dim=1)
    prompt_lengths = mask.sum(-1)
    with ps.steer(model, vec, layer, coef=4.0, scope=scope, prompt_lengths=prompt_lengths), torch.no_grad():
        forced = model(out.sequences, attention_mask=full_mask, position_ids=_positions(full_mask)).logits
    width = ids.shape[1]
    torch.testing.assert_close(cached, forced[:, width - 1 : width - 1 + steps], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = model(out.sequences, attention_mask=full_mask, position_ids=_positions(full_mask)).logits
    assert not torch.allclose(plain[:, width - 1 : width - 1 + steps], cached, atol=1e-3), "steering had no effect"


def test_kv_cached_generate_equals_teacher_forced_pass_embedded(embedded):
    handle = embedded
    chats = [[{"role": "user", "content": "Tell me about the sea."}],
             [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]]
    ids, mask = left_padded([handle.chat_ids(c) for c in chats], pad=handle.tokenizer.pad_token_id)
    vec = _vector(handle.model, scale=0.5)
    steps = 5
    with ps.steer(handle, vec, 12, coef=4.0), torch.no_grad():
        out = handle.model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                    do_sample=False, output_logits=True, return_dict_in_generate=True)
    full_mask = torch.cat([mask, torch.ones(2, steps, dtype=torch.long)], dim=1)
    with ps.steer(handle, vec, 12, coef=4.0, prompt_lengths=mask.sum(-1)), torch.no_grad():
        forced = handle.model(out.sequences, attention_mask=full_mask, position_ids=_positions(full_mask)).logits
    width = ids.shape[1]
    torch.testing.assert_close(torch.stack(out.logits, 1), forced[:, width - 1 : width - 1 + steps],
                               rtol=1e-3, atol=1e-3)


def test_batched_capture_equals_unbatched(tiny_any):
    model = tiny_any
    rows = [p + [30, 31, 32][: i + 1] for i, p in enumerate(PROMPTS)]
    prompt_lengths = [len(p) for p in PROMPTS]
    pools = ["response_avg", "prompt_avg", "prompt_last"]
    layers = [0, 1, len(decoder_layers(model))]
    ids, mask = left_padded(rows)
    with ps.capture(model, layers, pools, prompt_lengths=prompt_lengths) as cap:
        ps.run_forward(model, input_ids=ids, attention_mask=mask, position_ids=_positions(mask))
    for i, row in enumerate(rows):
        with ps.capture(model, layers, pools, prompt_lengths=[prompt_lengths[i]]) as single:
            ps.run_forward(model, input_ids=torch.tensor([row]))
        for pool in pools:
            torch.testing.assert_close(cap.mean(pool)[i], single.mean(pool)[0], rtol=1e-4, atol=1e-5)


def test_capture_matches_hf_hidden_states(tiny_any):
    model = tiny_any
    row = PROMPTS[0] + [30, 31, 32]
    n = len(decoder_layers(model))
    with torch.no_grad():
        states = model(torch.tensor([row]), output_hidden_states=True).hidden_states
    with ps.capture(model, list(range(n + 1)), ["response_avg", "prompt_last"], prompt_lengths=[6]) as cap:
        ps.run_forward(model, input_ids=torch.tensor([row]))
    for layer in range(n + 1):
        torch.testing.assert_close(cap.mean("response_avg")[0, layer], states[layer][0, 6:].mean(0))
        torch.testing.assert_close(cap.mean("prompt_last")[0, layer], states[layer][0, 5])


def test_batched_steering_equals_unbatched(tiny_llama):
    model = tiny_llama
    ids, mask = left_padded(PROMPTS)
    vec = _vector(model)
    with ps.steer(model, vec, [1, 3], coef=2.0, scope="all"), torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits
        for i, row in enumerate(PROMPTS):
            single = model(torch.tensor([row])).logits[0]
            torch.testing.assert_close(batched[i, -len(row):], single, rtol=1e-4, atol=1e-5)


def test_removed_hooks_leave_model_bit_identical(tiny_llama):
    model = tiny_llama
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    with ps.steer(model, _vector(model), 2, coef=5.0), ps.capture(model, [1, 4], "prompt_last"):
        with torch.no_grad():
            model(ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="boom"):
        with ps.steer(model, _vector(model), 2, coef=5.0, scope="all"):
            raise RuntimeError("boom")
    handle = ps.steer(model, _vector(model), 3, coef=5.0)
    handle.remove()
    with torch.no_grad():
        after = model(ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    manager = HookManager.of(model)
    assert manager._root_handle is None and not manager._handles


def test_add_changes_activation_by_exactly_coef_v_in_scope_only(tiny_llama):
    model = tiny_llama
    ids, mask = left_padded(PROMPTS)
    vec = _vector(model)
    layer = 2
    seen, stop = _record(model, layer)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=_positions(mask))
    base = seen[-1][0]
    prompt_lengths = torch.tensor([4, 1, 3])  # the rest of each row stands for a response
    for scope in ("prompt", "response", "all"):
        with ps.steer(model, vec, layer, coef=torch.tensor([1.0, -2.0, 0.5]), scope=scope,
                      prompt_lengths=prompt_lengths):
            # the recorder was added first, so move it after the steering op
            stop()
            seen, stop = _record(model, layer)
            with torch.no_grad():
                model(ids, attention_mask=mask, position_ids=_positions(mask))
        delta = seen[-1][0] - base
        tokens = seen[-1][1]
        in_scope = tokens.scope_mask(scope)
        coef = torch.tensor([1.0, -2.0, 0.5])[:, None, None]
        expected = torch.where(in_scope[..., None], coef * vec[layer], torch.zeros(()))
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)
        assert in_scope.any()
        assert scope == "all" or (~in_scope & tokens.valid).any(), "the scope must leave some real tokens alone"
        assert not in_scope[~tokens.valid].any(), "padding must never be in scope"
    stop()


def test_ablate_and_clamp_set_the_projection(tiny_llama):
    model = tiny_llama
    ids, mask = left_padded(PROMPTS)
    vec = _vector(model)
    unit = vec[2] / vec[2].norm()
    for mode, target in (("ablate", 0.0), ("clamp", 7.5)):
        with ps.steer(model, vec, 2, mode=mode, value=target, scope="all"):
            seen, stop = _record(model, 2)
            with torch.no_grad():
                model(ids, attention_mask=mask, position_ids=_positions(mask))
            stop()
        hidden, tokens = seen[-1]
        projection = hidden @ unit
        torch.testing.assert_close(projection[tokens.valid], torch.full_like(projection[tokens.valid], target),
                                   atol=1e-4, rtol=0)


def test_vectors_and_layers_compose(tiny_llama):
    model = tiny_llama
    ids = torch.tensor([PROMPTS[0]])
    a, b = _vector(model, seed=1), _vector(model, seed=2)
    with ps.steer(model, a, 2, coef=1.0, scope="all"), ps.steer(model, b, 2, coef=1.0, scope="all"):
        with torch.no_grad():
            both = model(ids).logits
    with ps.steer(model, a + b, 2, coef=1.0, scope="all"), torch.no_grad():
        summed = model(ids).logits
    torch.testing.assert_close(both, summed, rtol=1e-4, atol=1e-5)


def test_stop_after_runs_no_deeper_layer(tiny_llama):
    model = tiny_llama
    calls = []
    handle = decoder_layers(model)[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        with ps.capture(model, [2], "prompt_last", stop_after=True) as cap:
            assert ps.run_forward(model, input_ids=torch.tensor([PROMPTS[0]])) is None
        assert calls == [] and cap.mean("prompt_last").shape == (1, 1, 64)
        with torch.no_grad():
            model(torch.tensor([PROMPTS[0]]))
        assert calls == [1]
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "vector, layer, message",
    [
        (torch.full((5, 64), float("nan")), 2, "NaN"),
        (torch.zeros(5, 64), 2, "all zeros"),
        (torch.randn(5, 32), 2, "hidden size"),
        (torch.randn(7, 64), 2, "another model"),
        (torch.randn(5, 64), 9, "out of range"),
    ],
)
def test_bad_vectors_and_layers_raise_clear_errors(tiny_llama, vector, layer, message):
    with pytest.raises(ps.PersonascopeError, match=message):
        ps.steer(tiny_llama, vector, layer)
    assert HookManager.of(tiny_llama)._root_handle is None
