"""The foundation commands, run as a user runs them: a real process, one clear error line, non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from personascope.vector import PersonaVector


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "personascope.cli", *args], capture_output=True, text=True,
                          timeout=300)


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory, embedded):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("v") / "funny.safetensors"
    PersonaVector(torch.randn(31, 576), "humorous", "smollm2-135m", {"best_layer": "12", "best_coef": "6"}).save(path)
    return path


def test_info_reports_the_embedded_model(embedded):
    result = run("info")
    assert result.returncode == 0, result.stderr
    for needle in ("smollm2-135m", "30", "576", "float32", "cpu"):
        assert needle in result.stdout


def test_generate_steered_differs_from_plain(vector_file):
    plain = run("generate", "Describe a cat.", "--max-new-tokens", "12")
    steered = run("generate", "Describe a cat.", "--max-new-tokens", "12", "--vector", str(vector_file),
                  "--coef", "40")
    assert plain.returncode == 0 and steered.returncode == 0, steered.stderr
    assert "steering with humorous at layer 12, coef 40" in steered.stdout
    assert plain.stdout.strip() and steered.stdout.splitlines()[-1] != plain.stdout.splitlines()[-1]


def test_vector_show_and_gguf_export(vector_file, tmp_path):
    shown = run("vector", "show", str(vector_file))
    assert shown.returncode == 0 and "humorous" in shown.stdout and "31 rows × 576" in shown.stdout
    out = tmp_path / "funny.gguf"
    assert run("vector", "export-gguf", str(vector_file), str(out)).returncode == 0
    back = tmp_path / "back.safetensors"
    assert run("vector", "import-gguf", str(out), str(back), "--model", "smollm2-135m").returncode == 0
    assert torch.equal(PersonaVector.load(back).directions[2:], PersonaVector.load(vector_file).directions[2:])
    one_error_line(run("vector", "import-gguf", str(out), str(back)), "exists")


def test_import_pt(tmp_path):
    pt = tmp_path / "evil_response_avg_diff.pt"
    torch.save(torch.randn(31, 576), pt)
    out = tmp_path / "evil.safetensors"
    result = run("vector", "import-pt", str(pt), "--model", "smollm2-135m", str(out))
    assert result.returncode == 0, result.stderr
    assert PersonaVector.load(out).trait == "evil"
    torch.save(torch.randn(25, 896), pt)
    one_error_line(run("vector", "import-pt", str(pt), str(tmp_path / "x.safetensors")), "hidden size 896")


def test_bad_inputs_give_one_clear_line(tmp_path, vector_file):
    one_error_line(run("info", "--model", "no-such-model"), "unknown model", "smollm2-135m")
    one_error_line(run("vector", "show", str(tmp_path / "missing.safetensors")), "does not exist")
    other = tmp_path / "other.safetensors"
    PersonaVector(torch.randn(25, 896), "evil", "qwen").save(other)
    one_error_line(run("generate", "hi", "--vector", str(other), "--model", "smollm2-135m", "--coef", "1"),
                   "does not fit", "896")
    one_error_line(run("generate", "hi", "--vector", str(other)), "local model 'qwen'", "--model")
    nan = tmp_path / "nan.safetensors"
    save_file({"directions": torch.full((31, 576), float("nan"))}, str(nan), metadata={"trait": "x"})
    one_error_line(run("generate", "hi", "--vector", str(nan), "--coef", "1"), "NaN")
    one_error_line(run("generate", "hi", "--vector", str(vector_file), "--layer", "31"), "out of range")
