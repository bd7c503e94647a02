"""Hooks on big-model paths: models freed, one manager per decoder stack (PEFT and base), LIFO prompt lengths,
steering a continued cache, each layer's own device, float32 maths whatever the model dtype."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import personascope as ps
from personascope.apply.guard import PreventativeSteering
from personascope.hooks import HookManager, TokenContext, add_op, clamp_op
from personascope.model import decoder_layers, hidden_size

from .conftest import _tiny


def _vector(model, seed=1, scale=3.0):
    torch.manual_seed(seed)
    return torch.randn(len(decoder_layers(model)) + 1, hidden_size(model)) * scale


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU here"))])
def test_a_hooked_model_is_freed_once_nothing_else_holds_it(device):
    model = _tiny("llama").to(device)
    ref = weakref.ref(model)
    handle = ps.steer(model, _vector(model), 2, coef=1.0)
    cap = ps.capture(model, [1, 3], "prompt_last")
    PreventativeSteering(_vector(model), layers="2", coef=1.0).attach(model)  # the guard of a fine-tune
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]], device=device))
    cap.remove()  # one handle removed, the other still hooked: both cases must free the model
    del model, handle, cap
    gc.collect()
    assert ref() is None, "the HookManager kept the model alive"


def test_peft_model_and_its_base_share_one_manager():
    from peft import LoraConfig, get_peft_model

    base = _tiny("llama")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        plain = base(ids).logits.clone()
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    assert HookManager.of(peft_model) is HookManager.of(base)
    vec = _vector(base)
    with ps.steer(peft_model, vec, 2, coef=2.0, scope="all"), ps.steer(base, vec, 2, coef=-2.0, scope="all"):
        with torch.no_grad(), peft_model.disable_adapter():
            both = peft_model(ids).logits
    torch.testing.assert_close(both, plain, rtol=1e-5, atol=1e-5)  # +2v and -2v at one hook cancel
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.equal(peft_model(ids).logits, plain), "hooks left behind"


def test_prompt_lengths_are_removed_with_their_own_handle(tiny_llama):
    model = tiny_llama
    ids = torch.tensor([[5, 17, 3, 9, 22, 40, 7, 8]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[2][0]
    first = ps.steer(model, _vector(model), 1, coef=0.0, prompt_lengths=[2])
    cap = ps.capture(model, 2, "prompt_avg", prompt_lengths=[5])
    first.remove()  # out of order: the capture's lengths must stay
    ps.run_forward(model, input_ids=ids)
    cap.remove()
    torch.testing.assert_close(cap.mean("prompt_avg")[0, 0], hidden[:5].mean(0), rtol=1e-5, atol=1e-5)


def test_steering_a_continued_cache_treats_the_new_turn_as_prompt(tiny_llama):
    model = tiny_llama
    first = torch.tensor([[5, 17, 3, 9, 22]])
    with torch.no_grad():
        out = model.generate(first, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=0)
    turn = torch.cat([out.sequences, torch.tensor([[11, 12, 13, 14]])], dim=1)
    vec, steps = _vector(model), 4
    with ps.steer(model, vec, 2, coef=4.0), torch.no_grad():
        cont = model.generate(turn, past_key_values=out.past_key_values, max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)
    with ps.steer(model, vec, 2, coef=4.0, prompt_lengths=[turn.shape[1]]), torch.no_grad():
        forced = model(cont.sequences).logits
    width = turn.shape[1]
    torch.testing.assert_close(torch.stack(cont.logits, 1), forced[:, width - 1 : width - 1 + steps],
                               rtol=1e-4, atol=1e-4)


def _tokens(batch: int, length: int) -> TokenContext:
    positions = torch.arange(length).expand(batch, length)
    return TokenContext(valid=torch.ones(batch, length, dtype=torch.bool), positions=positions,
                        prompt_lengths=torch.full((batch,), 2))


def test_operations_follow_the_hidden_states_device():
    """A layer on another device (accelerate's device_map) hands its own hidden state: masks and directions go
    there. The meta device stands in for a second GPU on a CPU-only machine."""
    direction = torch.randn(8)
    tokens = _tokens(2, 5)
    hidden = torch.randn(2, 5, 8, device="meta")
    for op in (add_op(direction, 2.0, "response"), clamp_op(direction, 1.0, "all"),
               add_op(direction, torch.tensor([1.0, 2.0]), "prompt")):
        assert op(hidden, tokens).device.type == "meta"
    assert tokens.scope_mask("all", hidden.device).device.type == "meta"


def test_capture_keeps_each_layers_sums_wherever_that_layer_runs():
    model = _tiny("llama")
    manager = HookManager.of(model)
    cap = ps.capture(model, [1, 2], "response_avg")
    tokens = _tokens(2, 5)
    manager.tokens = tokens
    manager._run((1, "residual"), torch.randn(2, 5, 64, device="meta"))  # data can go to meta, not back
    manager._run((2, "residual"), torch.randn(2, 5, 64))
    cap.remove()
    assert cap.mean("response_avg").shape == (2, 2, 64)
    assert cap.mean("response_avg").device.type == "meta"


def test_clamp_in_bf16_computes_the_projection_in_float32():
    torch.manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(256), dim=0)
    hidden = (600.0 * unit + 0.5 * torch.randn(1, 3, 256)).to(torch.bfloat16)
    out = clamp_op(unit, 0.0, "all")(hidden, _tokens(1, 3))
    assert out.dtype == torch.bfloat16
    assert (out.float() @ unit).abs().max() < 0.1  # bf16 maths leaves ~600 * 2^-8 ≈ 2


def test_bf16_model_matches_its_fp32_twin():
    fp32 = _tiny("llama")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    vec = _vector(fp32, scale=1.0)
    pools = ("response_avg", "prompt_avg", "prompt_last")
    readings = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        with ps.capture(model, [1, 2, 3], pools, prompt_lengths=[10, 20]) as cap:
            with torch.no_grad():
                hidden = model(ids, output_hidden_states=True).hidden_states
        with ps.steer(model, vec, 2, coef=4.0, scope="all"), ps.capture(model, [3], "response_avg",
                                                                         prompt_lengths=[10, 20]) as steered:
            ps.run_forward(model, input_ids=ids)
        readings[name] = (cap, steered.mean()[:, 0] - cap.mean()[:, 2])
        if name == "bf16":  # exact float32 sums of the bf16 hidden states
            exact = torch.stack([h[0, 10:].double().mean(0) for h in hidden[1:4]]).float()
            torch.testing.assert_close(cap.mean("response_avg")[0], exact, rtol=1e-5, atol=1e-5)
    (cap32, effect32), (cap16, effect16) = readings["fp32"], readings["bf16"]
    for pool in pools:
        torch.testing.assert_close(cap16.mean(pool), cap32.mean(pool), rtol=0.05, atol=0.05)
    torch.testing.assert_close(effect16, effect32, rtol=0.05, atol=0.1)
