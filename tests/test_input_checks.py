"""Every numeric input checked: NaN, inf, negative or out-of-range values are one `error:` line and exit 2 in the
CLI (before anything is loaded or written), an `InputError` in the Python API."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from personascope.errors import InputError, PersonascopeError
from personascope.io.checks import check_count, check_number, check_temperature


def _exit_code(argv: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    """Run the real CLI entry point in this process; its exit code and stderr lines."""
    from personascope.cli import main

    monkeypatch.setattr(sys, "argv", ["personascope", *argv])
    with pytest.raises(SystemExit) as stopped:
        main()
    return stopped.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


BAD = [
    (["generate", "hi", "--coef", "nan"], "--coef nan is not a finite number"),
    (["generate", "hi", "--coef", "inf"], "--coef inf"),
    (["generate", "hi", "--temperature", "1e-30"], "--temperature 1e-30 must be at least 0.01"),
    (["generate", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "hi", "--repetition-penalty", "0"], "--repetition-penalty 0.0 must be in [0.1, 10]"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
    (["generate", "hi", "--layer", "-1"], "--layer -1 must be at least 0"),
    (["generate", "hi", "--seed", str(2**64)], "--seed"),
    (["extract", "evil", "--out", "{out}", "--threshold", "inf"], "--threshold inf"),
    (["extract", "evil", "--out", "{out}", "--coherence-threshold", "101"], "must be in [0, 100]"),
    (["extract", "evil", "--out", "{out}", "--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
    (["extract", "evil", "--out", "{out}", "--samples", "-2"], "--samples -2"),
    (["extract", "evil", "--out", "{out}", "--token-budget", "0"], "--token-budget 0"),
    (["extract", "evil", "--out", "{out}", "--batch-size", "0"], "--batch-size 0"),
    (["evaluate", "{out}", "--pairs", "0"], "--pairs 0"),
    (["monitor", "--vector", "v.safetensors", "--temperature", "nan"], "--temperature nan"),
    (["monitor", "--vector", "v.safetensors", "--batch-size", "-4"], "--batch-size -4"),
    (["screen", "d.jsonl", "--vector", "v.safetensors", "--out", "{out}", "--top", "-1"], "--drop-top -1.0"),
    (["screen", "d.jsonl", "--vector", "v.safetensors", "--out", "{out}", "--gpus-per-worker", "-1"], "at least 0"),
    (["screen", "d.jsonl", "--vector", "v.safetensors", "--out", "{out}", "--shard-rows", "0"], "--shard-rows"),
    (["shift", "d.jsonl", "--vector", "v.safetensors", "--batch-size", "0"], "--batch-size 0"),
    (["finetune", "d.jsonl", "--out", "{out}", "--lr", "nan"], "--lr nan"),
    (["finetune", "d.jsonl", "--out", "{out}", "--epochs", "0"], "--epochs 0.0 must be above 0"),
    (["finetune", "d.jsonl", "--out", "{out}", "--guard-coef", "-inf"], "--guard-coef -inf"),
    (["finetune", "d.jsonl", "--out", "{out}", "--max-steps", "-7"], "--max-steps -7"),
    (["serve", "--max-queue", "0"], "--max-queue 0"),
    (["serve", "--batch-wait-ms", "nan"], "--batch-wait-ms nan"),
    (["serve", "--port", "70000"], "--port 70000"),
    (["serve", "--threshold", "pirate=nan"], "--threshold pirate nan"),
]


@pytest.mark.parametrize("argv, needle", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_numbers_are_one_error_line_exit_2_and_nothing_written(argv, needle, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, lines = _exit_code([a.replace("{out}", str(out)) for a in argv], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_real_process_exits_2_before_loading_anything(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "personascope.cli", "generate", "hi", "--coef", "nan"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.strip() == "error: --coef nan is not a finite number"


def test_the_api_refuses_the_same_values() -> None:
    from personascope.hooks import steer
    from personascope.inference.generate import SamplingConfig
    from personascope.serve import Limits

    for bad in (dict(temperature=float("nan")), dict(temperature=1e-9), dict(top_p=0.0), dict(top_p=1.5),
                dict(max_new_tokens=0), dict(repetition_penalty=0.0), dict(seed=2**64), dict(max_new_tokens=2.5)):
        with pytest.raises(InputError):
            SamplingConfig(**bad)
    assert SamplingConfig(temperature=0).generate_kwargs()["do_sample"] is False
    for bad in (dict(max_queue=0), dict(max_tokens=-1), dict(max_coef=float("inf"))):
        with pytest.raises(InputError):
            Limits(**bad)
    model = torch.nn.Linear(2, 2)  # refused before the model is looked at
    for coef in (float("nan"), float("inf"), torch.tensor([1.0, float("nan")])):
        with pytest.raises(InputError, match="coef"):
            steer(model, torch.ones(3, 2), 1, coef)
    assert issubclass(InputError, PersonascopeError)


def test_checks_name_the_setting_and_its_range() -> None:
    assert check_number("x", 3, 0, 5) == 3 and check_count("n", 1) == 1 and check_temperature("t", 0) == 0
    for call, message in ((lambda: check_number("top_p", 0.0, 0, 1, open_low=True), "top_p 0.0 must be in (0, 1]"),
                          (lambda: check_number("coef", float("-inf")), "coef -inf is not a finite number"),
                          (lambda: check_number("coef", "3"), "coef '3' is not a finite number"),
                          (lambda: check_count("samples", True), "samples True must be a whole number"),
                          (lambda: check_count("samples", 0), "samples 0 must be at least 1"),
                          (lambda: check_temperature("temperature", 1e-40), "must be at least 0.01")):
        with pytest.raises(InputError) as refused:
            call()
        assert message in str(refused.value)


def test_fine_tuning_settings_and_the_guard_are_checked_the_same_way() -> None:
    from personascope.apply.finetune import FinetuneConfig
    from personascope.apply.guard import PreventativeSteering

    for bad, needle in ((dict(lr=float("nan")), "lr nan"), (dict(batch_size=0), "batch_size 0"),
                        (dict(epochs=float("inf")), "epochs inf"), (dict(max_steps=-3), "max_steps -3"),
                        (dict(lora_dropout=1.0), "lora_dropout 1"), (dict(epochs=0, max_steps=-1), "epochs or")):
        with pytest.raises(InputError, match=needle):
            FinetuneConfig(**bad).check()
    FinetuneConfig().check()
    with pytest.raises(InputError, match="guard coefficient inf"):
        PreventativeSteering(torch.ones(3, 2), 1, coef=float("inf"))


def test_every_batched_reader_refuses_a_batch_size_or_budget_below_1(tiny_chat) -> None:
    from personascope.inference.activations import encode, read_activations
    from personascope.model import load_model

    handle = load_model(str(tiny_chat))
    chats = [encode(handle, "a", [{"role": "user", "content": "hi"}], "hello")]
    for bad, needle in ((dict(max_batch=0), "max_batch 0"), (dict(token_budget=-1), "token_budget -1")):
        with pytest.raises(InputError, match=needle):
            read_activations(handle, chats, [1], ("response_avg",), progress=False, **bad)
    assert read_activations(handle, chats, [1], ("response_avg",), progress=False)["response_avg"].shape[0] == 1
