"""`TraitSpec`: a character trait as data, validated on construction."""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from personascope.errors import PersonascopeError

N_PAIRS = 5
"""System-prompt pairs in a standard spec."""
N_QUESTIONS = 20
"""Questions per split (extraction, evaluation) in a standard spec."""

TRAIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_REQUIRED = ("instruction", "eval_prompt")
_ALLOWED = ("name", "description", "instruction", "questions", "extract_questions", "eval_questions", "eval_prompt")
_REFERENCE_ALLOWED = ("name", "description", "instruction", "questions", "eval_prompt")
_HINTS = {
    "instruction": "a list of 5 {pos, neg} system-prompt pairs",
    "eval_prompt": "a judge rubric with {question} and {answer} placeholders",
    "questions": "a list of questions",
}
# The reference's rubrics open with this sentence; the rest of their first paragraph describes the trait.
_RUBRIC_LEAD = re.compile(r"\s*You are evaluating whether the model's response displays the trait:\s*\*\*[^*]*\*\*\.?")
_LENIENT = "(lenient loading, strict=False or --lenient, accepts other counts)"


@dataclass(frozen=True)
class InstructionPair:
    """One contrastive pair of system prompts.

    Attributes:
        pos: System prompt that elicits the trait.
        neg: System prompt that elicits its opposite.
    """

    pos: str
    neg: str


@dataclass(frozen=True)
class TraitSpec:
    """A validated trait spec; construction raises `PersonascopeError` on any problem.

    Attributes:
        name: Identifier (letters, digits, `_`, `-`, `.`), used in file names and vector metadata.
        description: What the trait is, in plain language.
        instruction: The pos/neg system-prompt pairs (5 in a standard spec).
        extract_questions: Questions whose answers build the vector.
        eval_questions: Held-out questions for validation; none repeats an extraction question.
        eval_prompt: Judge rubric; `.format(question=..., answer=...)` fills it.
        source: Where the spec was read from (for messages); not part of equality or `to_dict`.
    """

    name: str
    description: str
    instruction: tuple[InstructionPair, ...]
    extract_questions: tuple[str, ...]
    eval_questions: tuple[str, ...]
    eval_prompt: str
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = self._where()
        if not isinstance(self.name, str) or not TRAIT_NAME.match(self.name):
            raise PersonascopeError(
                f"{where}: 'name' must be letters, digits, '_', '-' or '.' (starting with a letter or digit), "
                f"got {self.name!r}; rename the trait"
            )
        _check_text(self.eval_prompt, "'eval_prompt'", where)
        _check_text(self.description, "'description'", where)
        pairs = _check_list(self.instruction, "instruction", where, "pair")
        for i, pair in enumerate(pairs, 1):
            if not isinstance(pair, InstructionPair):
                raise PersonascopeError(f"{where}: 'instruction' item {i} must be an InstructionPair, got {pair!r}")
            _check_text(pair.pos, f"'instruction' item {i} 'pos'", where)
            _check_text(pair.neg, f"'instruction' item {i} 'neg'", where)
            if _norm(pair.pos) == _norm(pair.neg):
                raise PersonascopeError(
                    f"{where}: 'instruction' item {i} has the same 'pos' and 'neg'; make 'neg' elicit the opposite"
                )
        _check_unique([p.pos for p in pairs], "the 'pos' prompts of 'instruction'", where)
        _check_unique([p.neg for p in pairs], "the 'neg' prompts of 'instruction'", where)
        extract = _check_strings(self.extract_questions, "extract_questions", where)
        evaluate = _check_strings(self.eval_questions, "eval_questions", where)
        shared = {_norm(q) for q in extract} & {_norm(q) for q in evaluate}
        if shared:
            first = next(q for q in evaluate if _norm(q) in shared)
            raise PersonascopeError(
                f"{where}: question {first!r} is both an extraction and an evaluation question "
                f"({len(shared)} shared in all); held-out evaluation needs distinct questions, remove it from one list"
            )
        problem = _rubric_problem(self.eval_prompt)
        if problem:
            raise PersonascopeError(f"{where}: 'eval_prompt' {problem}")
        for name in ("instruction", "extract_questions", "eval_questions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def _where(self) -> str:
        return f"trait file {self.source}" if self.source else f"trait {self.name!r}"

    def judge_prompt(self, question: str, answer: str) -> str:
        """Fill the rubric for one (question, answer).

        Args:
            question: The user question the model answered.
            answer: The model's response.

        Returns:
            The judge prompt text.
        """
        return self.eval_prompt.format(question=question, answer=answer)

    def to_dict(self) -> dict[str, Any]:
        """The spec as the JSON-ready dict of docs/ARCHITECTURE.md (split question lists)."""
        return {
            "name": self.name,
            "description": self.description,
            "instruction": [{"pos": p.pos, "neg": p.neg} for p in self.instruction],
            "extract_questions": list(self.extract_questions),
            "eval_questions": list(self.eval_questions),
            "eval_prompt": self.eval_prompt,
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        source: str | None = None,
        *,
        default_name: str | None = None,
        strict: bool = True,
    ) -> TraitSpec:
        """Build a spec from its JSON dict.

        Questions come either as `questions` (first half extraction, second half evaluation; 40 in a
        standard spec) or as `extract_questions` + `eval_questions`. A missing `description` is taken
        from the rubric's first paragraph (as in the reference's files).

        Args:
            data: The parsed JSON object.
            source: Where it came from (a path), used in error messages.
            default_name: Name to use when `data` has none (a file's stem).
            strict: Require 5 pairs and 20 + 20 questions; `False` accepts any counts of at least 1.

        Returns:
            The validated spec.

        Raises:
            PersonascopeError: Naming the source, the key and what to do, on any problem.
        """
        where = f"trait file {source}" if source else "trait spec"
        if not isinstance(data, Mapping):
            raise PersonascopeError(f"{where}: must be a JSON object, got {type(data).__name__}")
        _check_keys(data, _ALLOWED, _REQUIRED, where)
        instruction = _pairs(data["instruction"], where, strict)
        extract, evaluate = _split_questions(data, where, strict)
        name = data.get("name", default_name)
        if name is None:
            raise PersonascopeError(f"{where}: missing key 'name'; add the trait's name")
        return cls(
            name=name,
            description=data["description"] if "description" in data else _description_from(data["eval_prompt"]),
            instruction=instruction,
            extract_questions=tuple(extract),
            eval_questions=tuple(evaluate),
            eval_prompt=data["eval_prompt"],
            source=source,
        )

    @classmethod
    def from_reference_split(
        cls,
        extract: Mapping[str, Any],
        evaluation: Mapping[str, Any],
        *,
        name: str,
        extract_source: str | None = None,
        eval_source: str | None = None,
        strict: bool = True,
    ) -> TraitSpec:
        """Build a spec from the reference's split files (`trait_data_extract/<t>.json`, `trait_data_eval/<t>.json`).

        Instructions, rubric and extraction questions come from the extract file, evaluation questions
        from the eval file. An eval file whose instructions or rubric differ triggers a warning: they are
        not used.

        Args:
            extract: The extract file's JSON object (`instruction`, `questions`, `eval_prompt`).
            evaluation: The eval file's JSON object (`questions`; its other keys are checked, not used).
            name: The trait name (the files' stem).
            extract_source: Path of the extract file, for messages.
            eval_source: Path of the eval file, for messages.
            strict: As in `from_dict`.

        Returns:
            The validated spec.

        Raises:
            PersonascopeError: Naming the file, the key and what to do, on any problem.
        """
        where_extract = f"trait file {extract_source}" if extract_source else "extract spec"
        where_eval = f"trait file {eval_source}" if eval_source else "eval spec"
        for data, where in ((extract, where_extract), (evaluation, where_eval)):
            if not isinstance(data, Mapping):
                raise PersonascopeError(f"{where}: must be a JSON object, got {type(data).__name__}")
        _check_keys(extract, _REFERENCE_ALLOWED, ("instruction", "questions", "eval_prompt"), where_extract)
        _check_keys(evaluation, _REFERENCE_ALLOWED, ("questions",), where_eval)
        count = N_QUESTIONS if strict else None
        combined = {k: v for k, v in extract.items() if k != "questions"}
        combined["name"] = extract.get("name", name)
        combined["extract_questions"] = _questions(extract["questions"], "questions", where_extract, count)
        combined["eval_questions"] = _questions(evaluation["questions"], "questions", where_eval, count)
        for key in ("instruction", "eval_prompt"):
            if key in evaluation and evaluation[key] != extract[key]:
                warnings.warn(
                    f"{where_eval}: its '{key}' differs from the extract file's and is not used",
                    stacklevel=2,
                )
        return cls.from_dict(combined, extract_source, strict=strict)


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], required: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise PersonascopeError(
                f"{where}: unknown key {key!r}; allowed keys are {', '.join(allowed)} — fix or remove it"
            )
    for key in required:
        if key not in data:
            raise PersonascopeError(f"{where}: missing key {key!r}; add {_HINTS[key]}")


def _split_questions(data: Mapping[str, Any], where: str, strict: bool) -> tuple[list[str], list[str]]:
    split = [k for k in ("extract_questions", "eval_questions") if k in data]
    if "questions" in data:
        if split:
            raise PersonascopeError(
                f"{where}: give either 'questions' or 'extract_questions' + 'eval_questions', not both; remove one"
            )
        questions = _questions(data["questions"], "questions", where, 2 * N_QUESTIONS if strict else None)
        if len(questions) % 2:
            raise PersonascopeError(
                f"{where}: 'questions' must have an even count (first half extraction, second half evaluation), "
                f"found {len(questions)}; add or remove one"
            )
        half = len(questions) // 2
        return questions[:half], questions[half:]
    if len(split) == 1:
        other = "eval_questions" if split[0] == "extract_questions" else "extract_questions"
        raise PersonascopeError(f"{where}: has {split[0]!r} but no {other!r}; add it")
    if not split:
        raise PersonascopeError(
            f"{where}: missing key 'questions' (or 'extract_questions' + 'eval_questions'); add the questions"
        )
    count = N_QUESTIONS if strict else None
    return (
        _questions(data["extract_questions"], "extract_questions", where, count),
        _questions(data["eval_questions"], "eval_questions", where, count),
    )


def _questions(value: Any, key: str, where: str, count: int | None) -> list[str]:
    questions = _check_strings(value, key, where)
    if count is not None and len(questions) != count:
        raise PersonascopeError(
            f"{where}: {key!r} must have {count} questions, found {len(questions)}; add or remove questions {_LENIENT}"
        )
    return questions


def _pairs(value: Any, where: str, strict: bool) -> tuple[InstructionPair, ...]:
    items = _check_list(value, "instruction", where, "{pos, neg} pair")
    if strict and len(items) != N_PAIRS:
        raise PersonascopeError(
            f"{where}: 'instruction' must have {N_PAIRS} {{pos, neg}} pairs, found {len(items)}; "
            f"add or remove pairs {_LENIENT}"
        )
    pairs = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, Mapping) or set(item) != {"pos", "neg"}:
            got = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise PersonascopeError(
                f"{where}: 'instruction' item {i} must be an object with exactly the keys 'pos' and 'neg', got {got}"
            )
        pairs.append(InstructionPair(pos=item["pos"], neg=item["neg"]))
    return tuple(pairs)


def _check_list(value: Any, key: str, where: str, what: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise PersonascopeError(f"{where}: {key!r} must be a list of {what}s, got {type(value).__name__}")
    if not value:
        raise PersonascopeError(f"{where}: {key!r} is empty; add at least one {what}")
    return list(value)


def _check_strings(value: Any, key: str, where: str) -> list[str]:
    items = _check_list(value, key, where, "question")
    for i, item in enumerate(items, 1):
        _check_text(item, f"{key!r} item {i}", where)
    _check_unique(items, repr(key), where)
    return items


def _check_text(value: Any, label: str, where: str) -> None:
    if not isinstance(value, str):
        raise PersonascopeError(f"{where}: {label} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise PersonascopeError(f"{where}: {label} is empty; write the text or remove the item")


def _check_unique(items: Sequence[str], label: str, where: str) -> None:
    seen: set[str] = set()
    for item in items:
        if _norm(item) in seen:
            raise PersonascopeError(f"{where}: duplicate in {label}: {item!r}; replace or remove it")
        seen.add(_norm(item))


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _rubric_problem(text: str) -> str | None:
    """What is wrong with a rubric as a `.format(question=, answer=)` template, or None."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        return f"has an unmatched brace ({exc}); write literal braces as '{{{{' and '}}}}'"
    for name, spec, conv in fields:
        if name not in ("question", "answer"):
            return (
                f"has a stray placeholder '{{{name}}}'; only {{question}} and {{answer}} are filled, "
                "so write literal braces as '{{' and '}}'"
            )
        if spec or conv:
            return f"has '{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}'; write plain {{{name}}}"
    names = {name for name, _, _ in fields}
    for name in ("question", "answer"):
        if name not in names:
            doubled = "{{" + name + "}}"
            hint = f" ('{doubled}' renders as literal text: use single braces)" if doubled in text else ""
            return f"has no {{{name}}} placeholder{hint}; add it where the judge should see the {name}"
    return None


def _description_from(rubric: Any) -> str:
    """The reference files have no description: use the rubric's first paragraph, without its lead-in."""
    if not isinstance(rubric, str):
        return rubric  # the spec's own check reports the bad rubric
    first = rubric.strip().split("\n\n", 1)[0]
    return _RUBRIC_LEAD.sub("", first, count=1).strip() or first
