"""Preventative steering: on in training forward passes only, exact per-layer maths, checked before it attaches."""

from __future__ import annotations

import pytest
import torch

from personascope import PersonascopeError, PersonaVector, steer
from personascope.apply.callbacks import GuardCallback
from personascope.apply.guard import (
    GUARD_FRACTION,
    PreventativeSteering,
    default_guard_coef,
)
from personascope.hooks import HookManager
from personascope.io.layers import parse_layers
from personascope.model import decoder_layers, hidden_size

from .conftest import left_padded

ROWS = [[5, 17, 3, 9, 22, 40], [7, 8, 30]]


def _vector(model, seed=1, scale=3.0):
    torch.manual_seed(seed)
    return torch.randn(len(decoder_layers(model)) + 1, hidden_size(model)) * scale


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits.detach()


def _observe(model, layer, sink):
    """An observer at `layer` that stores each call's hidden state (runs where it is added in the op order)."""
    return HookManager.of(model).add(layer, lambda hidden, tokens: sink.append(hidden.detach().clone()))


def test_guard_steers_training_passes_only(tiny_llama):
    model, (ids, mask) = tiny_llama, left_padded(ROWS)
    vec = _vector(model)
    with torch.no_grad():
        plain = _logits(model, ids, mask)
        plain_generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with steer(model, vec, [1, 3], 4.0, "all"):
        expected = _logits(model, ids, mask)
    keys = set(model.state_dict())
    guard = PreventativeSteering(vec, [1, 3], coef=4.0)
    try:
        with guard.attach(model):
            model.train()
            trained = _logits(model, ids, mask)
            with torch.no_grad():  # what generate() and evaluation loops run under
                no_grad = _logits(model, ids, mask)
                generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            model.eval()
            evaluated = _logits(model, ids, mask)
            assert set(model.state_dict()) == keys
        model.train()
        detached = _logits(model, ids, mask)
    finally:
        model.eval()
    torch.testing.assert_close(trained, expected)  # every real token, as `steer(scope="all")`
    assert not torch.allclose(trained, plain)
    torch.testing.assert_close(no_grad, plain)
    torch.testing.assert_close(evaluated, plain)
    torch.testing.assert_close(detached, plain)
    assert torch.equal(generated, plain_generated)
    assert not guard.attached


@pytest.mark.parametrize("incremental", [True, False])
def test_each_layer_adds_what_it_promises(tiny_llama, incremental):
    model, (ids, mask) = tiny_llama, left_padded(ROWS)
    vec, layers, coef = _vector(model), [1, 2, 4], 2.5
    before = {layer: [] for layer in layers}
    after = {layer: [] for layer in layers}
    manager = HookManager.of(model)
    keys = [_observe(model, layer, before[layer]) for layer in layers]
    guard = PreventativeSteering(vec, layers, coef=coef, incremental=incremental).attach(model)
    keys += [_observe(model, layer, after[layer]) for layer in layers]
    try:
        model.train()
        _logits(model, ids, mask)
    finally:
        model.eval()
        guard.detach()
        for key in keys:
            manager.remove(key)
    valid = mask.bool()
    for i, layer in enumerate(layers):
        delta = (after[layer][0] - before[layer][0])[valid]  # [real tokens, d]
        want = coef * (vec[layer] - vec[layers[i - 1]]) if incremental and i else coef * vec[layer]
        torch.testing.assert_close(delta, want.expand_as(delta), rtol=1e-4, atol=1e-4)
    assert torch.equal(after[1][0][~valid], before[1][0][~valid])  # padding untouched


def test_ablate_projects_the_direction_out_in_training_only(tiny_llama):
    model, (ids, mask) = tiny_llama, left_padded(ROWS)
    vec, layer = _vector(model), 2
    seen: dict[str, list] = {"train": [], "eval": []}
    guard = PreventativeSteering(vec, layer, mode="ablate").attach(model)
    mode = {"now": "train"}
    manager = HookManager.of(model)
    key = manager.add(layer, lambda hidden, tokens: seen[mode["now"]].append(hidden.detach().clone()))
    try:
        model.train()
        _logits(model, ids, mask)
        model.eval()
        mode["now"] = "eval"
        _logits(model, ids, mask)
    finally:
        model.eval()
        manager.remove(key)
        guard.detach()
    unit = vec[layer] / vec[layer].norm()
    valid = mask.bool()
    trained = seen["train"][0][valid] @ unit
    assert trained.abs().max() < 1e-4
    assert (seen["eval"][0][valid] @ unit).abs().max() > 1e-2


def test_bad_vectors_and_layers_stop_before_anything_is_attached(tiny_llama):
    model, (ids, mask) = tiny_llama, left_padded(ROWS)
    n = len(decoder_layers(model))
    good = _vector(model)
    nan = good.clone()
    nan[2, 0] = float("nan")
    cases = [
        (PreventativeSteering(nan, 2), "NaN"),
        (PreventativeSteering(torch.randn(n + 1, 32), 2), "hidden size"),
        (PreventativeSteering(PersonaVector(torch.randn(n + 1, 32), "evil", "other-model"), 2), "does not fit"),
        (PreventativeSteering(good, [1, 99]), "out of range"),
    ]
    model.train()
    try:
        for guard, message in cases:
            with pytest.raises(PersonascopeError, match=message):
                guard.attach(model)
            assert not guard.attached
        torch.testing.assert_close(_logits(model, ids, mask), _logits(model.eval(), ids, mask))
    finally:
        model.eval()
    with pytest.raises(PersonascopeError, match="incremental"):
        PreventativeSteering(good, [1, 2], mode="ablate", incremental=True)
    with pytest.raises(PersonascopeError, match="finite"):
        PreventativeSteering(good, 1, coef=float("nan"))


def test_default_guard_coef_is_a_fraction_of_the_best_and_needs_one():
    directions = torch.randn(5, 8)
    assert default_guard_coef(PersonaVector(directions, "evil", "m", {"best_coef": "6"})) == GUARD_FRACTION * 6
    with pytest.raises(PersonascopeError, match="no best coefficient"):
        default_guard_coef(PersonaVector(directions, "evil", "m"))


def test_layer_choices_all_ranges_and_lists():
    assert parse_layers("all", 30) == list(range(1, 30))
    assert parse_layers("12, 10", 30) == [10, 12]
    assert parse_layers("6-8,12,7") == [6, 7, 8, 12]
    assert parse_layers(7, 30) == [7]
    for bad, message in (("middle", "a range like 6-14"), ("", "no layers given"), ("all", "not available")):
        with pytest.raises(PersonascopeError, match=message):
            parse_layers(bad)


def test_trainer_callback_attaches_for_training_and_detaches_after(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    def run(callbacks):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, intermediate_size=64, vocab_size=64))
        rows = [{"input_ids": torch.arange(3, 11), "labels": torch.arange(3, 11)} for _ in range(4)]
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                 logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                                 disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks).train()
        return model

    plain = run([])
    guard = PreventativeSteering(torch.ones(3, 32), [1, 2], coef=3.0, incremental=True)
    guarded = run([GuardCallback(guard)])
    assert not guard.attached  # detached at the end of training
    changed = [not torch.equal(a, b) for a, b in zip(plain.parameters(), guarded.parameters())]
    assert any(changed)  # the guard's steering shaped the first (and only) update
    ids = torch.arange(3, 11)[None]
    guarded.train()
    torch.testing.assert_close(guarded(input_ids=ids).logits, guarded.eval()(input_ids=ids).logits)
