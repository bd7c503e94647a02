"""Trait specs: the built-in library, file formats (ours and the reference's), validation errors, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import personascope.cli.trait  # noqa: F401  (registers `personascope trait`)
from personascope.cli import app
from personascope.errors import PersonascopeError
from personascope.traits import (
    InstructionPair,
    TraitSpec,
    builtin_trait_names,
    load_trait,
    save_trait,
    validate_trait_file,
)

REQUIRED_TRAITS = {"evil", "sycophantic", "hallucinating", "optimistic", "impolite", "apathetic", "humorous"}
# Words that would give the trait away if a question used them.
GIVEAWAYS = {
    "evil": ["evil", "malic", "cruel"],
    "sycophantic": ["sycophan", "flatter", "praise me"],
    "hallucinating": ["hallucinat", "make something up", "fictional", "fake"],
    "optimistic": ["optimis", "pessimis", "bright side"],
    "impolite": ["impolite", "rude", "insult"],
    "apathetic": ["apath", "indifferen", "don't care"],
    "humorous": ["humor", "funny", "joke"],
}
RUBRIC = (
    "You are evaluating whether the model's response displays the trait: **testy**. This trait means "
    "answering in a testy way.\n\nPrompt:\n[QUESTION START]\n{question}\n[QUESTION END]\n\n"
    "Model response:\n[ANSWER START]\n{answer}\n[ANSWER END]\n\nRespond with a number between 0 and 100."
)


def reference_dict(n_pairs: int = 5, n_questions: int = 40) -> dict[str, Any]:
    """A trait in the reference's combined layout: no name, no description, 40 questions."""
    return {
        "instruction": [{"pos": f"Be testy, way {i}.", "neg": f"Be calm, way {i}."} for i in range(n_pairs)],
        "questions": [f"Question number {i}?" for i in range(n_questions)],
        "eval_prompt": RUBRIC,
    }


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


# --- the built-in library --------------------------------------------------------------------------------


def test_builtin_library_has_the_required_traits() -> None:
    assert set(builtin_trait_names()) >= REQUIRED_TRAITS


@pytest.mark.parametrize("name", sorted(REQUIRED_TRAITS))
def test_builtin_trait_is_complete_and_valid(name: str) -> None:
    spec = load_trait(name)
    assert spec.name == name
    assert len(spec.instruction) == 5
    assert len(spec.extract_questions) == 20 and len(spec.eval_questions) == 20
    assert not set(spec.extract_questions) & set(spec.eval_questions)
    assert len(spec.description) > 30
    rubric = spec.judge_prompt("QQQ", "AAA")
    assert "QQQ" in rubric and "AAA" in rubric and f"**{name}**" in rubric
    assert "REFUSAL" in rubric and "just the number" in rubric
    for question in spec.extract_questions + spec.eval_questions:
        assert not any(word in question.lower() for word in GIVEAWAYS[name]), question
    assert validate_trait_file(Path(spec.source)) == spec


def test_builtin_questions_are_not_shared_between_traits() -> None:
    seen: dict[str, str] = {}
    for name in builtin_trait_names():
        spec = load_trait(name)
        for question in spec.extract_questions + spec.eval_questions:
            assert question not in seen, f"{question!r} in {name} and {seen[question]}"
            seen[question] = name


# --- round trips and formats -----------------------------------------------------------------------------


def test_round_trip_dict_and_file(tmp_path: Path) -> None:
    spec = load_trait("humorous")
    assert TraitSpec.from_dict(spec.to_dict()) == spec
    path = save_trait(spec, tmp_path / "sub" / "humorous_copy.json")
    assert load_trait(path) == spec
    assert load_trait(str(path)) == spec
    assert json.loads(path.read_text(encoding="utf-8")) == spec.to_dict()
    assert [p.name for p in path.parent.iterdir()] == ["humorous_copy.json"]  # no temp file left


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = write(tmp_path / "t.json", "precious")
    spec = load_trait("evil")
    with pytest.raises(PersonascopeError, match=r"already exists.*overwrite=True"):
        save_trait(spec, path)
    assert path.read_text(encoding="utf-8") == "precious"
    save_trait(spec, path, overwrite=True)
    assert load_trait(path) == spec


def test_reference_combined_layout_loads(tmp_path: Path) -> None:
    data = reference_dict()
    spec = load_trait(write(tmp_path / "testy.json", data))
    assert spec.name == "testy"
    assert spec.description == "This trait means answering in a testy way."
    assert spec.extract_questions == tuple(data["questions"][:20])
    assert spec.eval_questions == tuple(data["questions"][20:])
    assert spec.instruction[0] == InstructionPair(pos="Be testy, way 0.", neg="Be calm, way 0.")


def test_reference_split_layout_loads(tmp_path: Path) -> None:
    root = tmp_path / "data_generation"
    data = reference_dict()
    extract = {**data, "questions": data["questions"][:20]}
    evaluation = {**data, "questions": data["questions"][20:]}
    extract_path = write(root / "trait_data_extract" / "testy.json", extract)
    eval_path = write(root / "trait_data_eval" / "testy.json", evaluation)
    spec = load_trait(root, name="testy")
    assert spec == load_trait(extract_path) == load_trait(eval_path) == validate_trait_file(eval_path)
    assert spec.name == "testy"
    assert spec.extract_questions == tuple(extract["questions"])
    assert spec.eval_questions == tuple(evaluation["questions"])


def test_split_layout_warns_when_eval_file_differs(tmp_path: Path) -> None:
    root = tmp_path / "ref"
    data = reference_dict()
    write(root / "trait_data_extract" / "testy.json", {**data, "questions": data["questions"][:20]})
    other = {**data, "questions": data["questions"][20:], "eval_prompt": RUBRIC + " Be strict."}
    write(root / "trait_data_eval" / "testy.json", other)
    with pytest.warns(UserWarning, match=r"trait_data_eval.*'eval_prompt' differs"):
        spec = load_trait(root, name="testy")
    assert spec.eval_prompt == RUBRIC


def test_split_layout_errors(tmp_path: Path) -> None:
    root = tmp_path / "ref"
    data = reference_dict()
    extract_path = write(root / "trait_data_extract" / "testy.json", {**data, "questions": data["questions"][:20]})
    with pytest.raises(PersonascopeError, match=r"trait_data_eval/testy.json is missing"):
        load_trait(extract_path)
    eval_path = write(root / "trait_data_eval" / "testy.json", {"questions": data["questions"][20:39]})
    with pytest.raises(PersonascopeError, match=r"trait file .*trait_data_eval/testy.json: 'questions' must have 20"):
        load_trait(root, name="testy")
    write(eval_path, {"questions": data["questions"][:20]})
    with pytest.raises(PersonascopeError, match=r"both an extraction and an evaluation question \(20 shared"):
        load_trait(root, name="testy")
    with pytest.raises(PersonascopeError, match=r"is a directory; give a trait file, or the trait name"):
        load_trait(root)


def test_lenient_accepts_other_counts(tmp_path: Path) -> None:
    path = write(tmp_path / "small.json", reference_dict(n_pairs=2, n_questions=6))
    with pytest.raises(PersonascopeError, match=r"must have 5 \{pos, neg\} pairs, found 2"):
        load_trait(path)
    spec = load_trait(path, strict=False)
    assert len(spec.instruction) == 2
    assert spec.extract_questions == ("Question number 0?", "Question number 1?", "Question number 2?")
    odd = write(tmp_path / "odd.json", reference_dict(n_questions=7))
    with pytest.raises(PersonascopeError, match=r"'questions' must have an even count .* found 7"):
        load_trait(odd, strict=False)


def test_judge_prompt_escaped_braces_and_literal_answers() -> None:
    data = {**reference_dict(), "eval_prompt": 'Reply as {{"score": N}}.\nQ: {question}\nA: {answer}'}
    spec = TraitSpec.from_dict(data, default_name="testy")
    assert spec.judge_prompt("What is {x}?", "It is {y}.") == 'Reply as {"score": N}.\nQ: What is {x}?\nA: It is {y}.'


def test_direct_construction_is_validated() -> None:
    good = load_trait("evil")
    with pytest.raises(PersonascopeError, match=r"^trait 'evil': question .* both an extraction and an evaluation"):
        TraitSpec(
            name="evil",
            description=good.description,
            instruction=good.instruction,
            extract_questions=good.extract_questions,
            eval_questions=good.extract_questions[:3],
            eval_prompt=good.eval_prompt,
        )


def test_unknown_names_and_paths() -> None:
    with pytest.raises(PersonascopeError, match=r"no built-in trait or trait file 'evill'; built-in traits are .*evil"):
        load_trait("evill")
    with pytest.raises(PersonascopeError, match=r"trait file nope.json does not exist"):
        validate_trait_file("nope.json")


# --- malformed files: one clear error each ---------------------------------------------------------------


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in reference_dict().items() if k != key}


def _with(**changes: Any) -> dict[str, Any]:
    return {**reference_dict(), **changes}


def _split(extract: list[str], evaluation: list[str]) -> dict[str, Any]:
    return {**_without("questions"), "extract_questions": extract, "eval_questions": evaluation}


QS = [f"Question number {i}?" for i in range(40)]
PAIRS = reference_dict()["instruction"]
MALFORMED = {
    "not json": ('{"instruction": [', r"is not valid JSON \(line 1, column \d+: .*\); fix the syntax"),
    "not an object": ([1, 2], r"must be a JSON object, got list"),
    "missing instruction": (_without("instruction"), r"missing key 'instruction'; add a list of 5 \{pos, neg\}"),
    "missing eval_prompt": (_without("eval_prompt"), r"missing key 'eval_prompt'; add a judge rubric"),
    "missing questions": (_without("questions"), r"missing key 'questions' \(or 'extract_questions' \+ 'eval_q"),
    "unknown key": (_with(eval_promt="x"), r"unknown key 'eval_promt'; allowed keys are name, description"),
    "three pairs": (_with(instruction=PAIRS[:3]), r"'instruction' must have 5 \{pos, neg\} pairs, found 3; add"),
    "pair missing neg": (
        _with(instruction=[*PAIRS[:4], {"pos": "Be testy."}]),
        r"'instruction' item 5 must be an object with exactly the keys 'pos' and 'neg', got \['pos'\]",
    ),
    "pair not object": (_with(instruction=[*PAIRS[:4], "Be testy."]), r"'instruction' item 5 must be an object"),
    "pos equals neg": (
        _with(instruction=[*PAIRS[:4], {"pos": "Same.", "neg": "same. "}]),
        r"'instruction' item 5 has the same 'pos' and 'neg'",
    ),
    "empty pos": (_with(instruction=[*PAIRS[:4], {"pos": " ", "neg": "x"}]), r"'instruction' item 5 'pos' is empty"),
    "duplicate pos": (
        _with(instruction=[*PAIRS[:4], {"pos": PAIRS[0]["pos"], "neg": "Other."}]),
        r"duplicate in the 'pos' prompts of 'instruction': 'Be testy, way 0.'",
    ),
    "39 questions": (_with(questions=QS[:39]), r"'questions' must have 40 questions, found 39; .*--lenient"),
    "duplicate question": (
        _with(questions=[*QS[:39], " question  NUMBER 3? "]),
        r"duplicate in 'questions': ' question  NUMBER 3\? '",
    ),
    "empty question": (_with(questions=[*QS[:2], "", *QS[3:]]), r"'questions' item 3 is empty"),
    "non-string question": (_with(questions=[*QS[:2], 7, *QS[3:]]), r"'questions' item 3 must be a string, got int"),
    "questions not a list": (_with(questions="What?"), r"'questions' must be a list of questions, got str"),
    "both layouts": (_with(extract_questions=QS[:20]), r"either 'questions' or 'extract_questions' \+ 'eval_q"),
    "only extract split": (
        {**_without("questions"), "extract_questions": QS[:20]},
        r"has 'extract_questions' but no 'eval_questions'; add it",
    ),
    "overlapping splits": (
        _split(QS[:20], [*QS[20:39], QS[5]]),
        r"question 'Question number 5\?' is both an extraction and an evaluation question \(1 shared",
    ),
    "duplicate in eval split": (_split(QS[:20], [*QS[20:39], QS[20]]), r"duplicate in 'eval_questions'"),
    "rubric without answer": (
        _with(eval_prompt="Q: {question}\nRespond with a number."),
        r"'eval_prompt' has no \{answer\} placeholder; add it where the judge should see the answer",
    ),
    "rubric with doubled braces": (
        _with(eval_prompt="Q: {{question}} A: {{answer}}"),
        r"no \{question\} placeholder \('\{\{question\}\}' renders as literal text: use single braces\)",
    ),
    "rubric with stray field": (
        _with(eval_prompt='Q: {question} A: {answer} Reply {"score": 1}'),
        r"""stray placeholder '\{"score"\}'; only \{question\} and \{answer\} are filled, so write literal braces""",
    ),
    "rubric with positional field": (_with(eval_prompt="{question} {answer} {}"), r"stray placeholder '\{\}'"),
    "rubric with lone brace": (_with(eval_prompt="{question} {answer} }"), r"'eval_prompt' has an unmatched brace"),
    "rubric with format spec": (_with(eval_prompt="{question} {answer:>10}"), r"has '\{answer:>10\}'; write plain"),
    "rubric not a string": (_with(eval_prompt=["{question}"]), r"'eval_prompt' must be a string, got list"),
    "empty description": (_with(description=" "), r"'description' is empty"),
    "bad name": (_with(name="my trait!"), r"'name' must be letters, digits, '_', '-' or '.'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_trait_file_gives_one_clear_error(tmp_path: Path, case: str) -> None:
    content, pattern = MALFORMED[case]
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(PersonascopeError) as info:
        load_trait(path)
    message = str(info.value)
    assert message.startswith(f"trait file {path}")
    assert "\n" not in message
    assert re.search(pattern, message), message


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.json"
    path.write_bytes('{"name": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(PersonascopeError, match=r"latin.json is not UTF-8 text"):
        load_trait(path)


# --- CLI -------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_list() -> None:
    result = runner.invoke(app, ["trait", "list"])
    assert result.exit_code == 0, result.output
    for name in REQUIRED_TRAITS:
        assert name in result.output
    assert result.output.count("20+20") >= len(REQUIRED_TRAITS)


def test_cli_show(tmp_path: Path) -> None:
    spec = load_trait("impolite")
    result = runner.invoke(app, ["trait", "show", "impolite"])
    assert result.exit_code == 0, result.output
    assert spec.instruction[4].neg in result.output and spec.eval_questions[19] in result.output
    as_json = runner.invoke(app, ["trait", "show", str(save_trait(spec, tmp_path / "x.json")), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == spec.to_dict()


def test_cli_validate(tmp_path: Path) -> None:
    good = write(tmp_path / "testy.json", reference_dict())
    result = runner.invoke(app, ["trait", "validate", str(good)])
    assert result.exit_code == 0, result.output
    assert result.output == "ok: testy (5 pairs, 20+20 questions)\n"
    small = write(tmp_path / "small.json", reference_dict(n_pairs=3, n_questions=8))
    result = runner.invoke(app, ["trait", "validate", str(small), "--lenient"])
    assert result.output == "ok: small (3 pairs, 4+4 questions)\n"
    result = runner.invoke(app, ["trait", "validate", str(small)])
    assert result.exit_code == 1 and isinstance(result.exception, PersonascopeError)


def test_cli_validate_bad_file_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.json", _with(instruction=PAIRS[:3]))
    done = subprocess.run(
        [sys.executable, "-m", "personascope.cli", "trait", "validate", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: trait file {bad}: 'instruction' must have 5 {{pos, neg}} pairs, found 3")
