"""Batched pooled activations equal a naive one-row-at-a-time reading of HF hidden states."""

from __future__ import annotations

import torch

from personascope.inference.activations import encode, read_activations

CHATS = [
    ([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "How is the weather?"}],
     "Arr, the skies be grey and the wind be howlin' over the deck!"),
    ([{"role": "user", "content": "Name a fruit."}], "An apple."),
    ([{"role": "user", "content": "What is two plus two? Explain step by step please."}],
     "Two plus two is four, because adding two to two gives four."),
]


def test_batched_pooling_matches_naive_hidden_states(embedded):
    chats = [encode(embedded, str(i), m, r) for i, (m, r) in enumerate(CHATS)]
    layers = [0, 7, 15, 30]
    pooled = read_activations(embedded, chats, layers, ["response_avg", "prompt_avg", "prompt_last"],
                              progress=False, token_budget=200)
    for i, chat in enumerate(chats):
        with torch.no_grad():
            states = embedded.model(torch.tensor([chat.ids]), output_hidden_states=True).hidden_states
        p = chat.prompt_len
        for j, layer in enumerate(layers):
            torch.testing.assert_close(pooled["response_avg"][i, j], states[layer][0, p:].mean(0), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(pooled["prompt_avg"][i, j], states[layer][0, :p].mean(0), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(pooled["prompt_last"][i, j], states[layer][0, p - 1], rtol=1e-4, atol=1e-4)


def test_prompt_ids_come_from_concatenation(embedded):
    chat = encode(embedded, "x", CHATS[0][0], CHATS[0][1])
    assert chat.ids[: chat.prompt_len] == embedded.chat_ids(CHATS[0][0])
    assert embedded.tokenizer.decode(chat.ids[chat.prompt_len:]) == CHATS[0][1]
