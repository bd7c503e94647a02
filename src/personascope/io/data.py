"""Chat datasets in and out: JSONL, CSV, Parquet or a saved HF dataset directory, read with `datasets`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personascope.errors import PersonascopeError
from personascope.io.files import atomic_write, check_output
from personascope.io.records import encode

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class ChatSample:
    """One usable row: its id, the prompt turns, the response, and the input row's fields unchanged."""

    id: str
    prompt: list[dict[str, str]]
    response: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class BadRow:
    """A row that was left out, and why."""

    id: str
    reason: str


def load_rows(path: str | Path) -> Any:
    """Read a dataset file or saved dataset directory into a `datasets.Dataset`."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise PersonascopeError(f"dataset {path} does not exist")
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[next(iter(loaded))]
            return loaded
        builder = _FORMATS.get(path.suffix.lower())
        if builder is None:
            raise PersonascopeError(
                f"dataset {path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv, .parquet or a saved "
                "dataset directory"
            )
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except PersonascopeError:
        raise
    except Exception as exc:  # datasets raises many kinds on malformed files
        raise PersonascopeError(f"cannot read dataset {path}: {str(exc).splitlines()[0]}") from None


def row_id(row: dict[str, Any], index: int) -> str:
    """The row's own `id` when it has one, else its index."""
    value = row.get("id")
    return str(value) if value is not None and str(value) != "" else str(index)


def parse_messages(value: Any) -> list[dict[str, str]] | None:
    """A `messages` cell (a list, or its JSON text) as `[{role, content}]` strings; None when malformed."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        return None
    return [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in value]


def to_sample(row: dict[str, Any], index: int) -> ChatSample | BadRow:
    """Turn one input row into a `ChatSample`, or a `BadRow` saying what is wrong with it."""
    rid = row_id(row, index)
    if row.get("messages") is not None:
        messages = parse_messages(row["messages"])
        if messages is None:
            return BadRow(rid, "'messages' is not a list of {role, content}")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return BadRow(rid, "no assistant message")
        prompt, response = messages[:last], messages[last]["content"]
    elif "prompt" in row and "response" in row:
        prompt = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
        prompt.append({"role": "user", "content": str(row.get("prompt") or "")})
        response = str(row.get("response") or "")
    else:
        return BadRow(rid, "needs a 'messages' column or 'prompt' and 'response' columns")
    if not response.strip():
        return BadRow(rid, "empty response")
    if not any(m["role"] == "user" for m in prompt):
        return BadRow(rid, "no user message before the assistant's response")
    return ChatSample(rid, prompt, response, dict(row))


def iter_rows(path: str | Path, chunk_rows: int = 1000) -> Iterator[list[dict[str, Any]]]:
    """The rows of a dataset file, `chunk_rows` at a time, never the whole file in memory: JSONL line by line,
    Parquet by record batches, other formats through `datasets` (memory-mapped Arrow)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".jsonl":
        yield from _jsonl_chunks(path, chunk_rows)
    elif path.is_file() and suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            reader = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several kinds on a damaged file
            raise PersonascopeError(f"cannot read dataset {path}: {str(exc).splitlines()[0]}") from None
        for batch in reader.iter_batches(batch_size=chunk_rows):
            yield batch.to_pylist()
    else:
        rows = load_rows(path)
        for start in range(0, len(rows), chunk_rows):
            part = rows[start : start + chunk_rows]
            yield [dict(zip(part, values)) for values in zip(*part.values())]


def _jsonl_chunks(path: Path, chunk_rows: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise PersonascopeError(f"cannot read dataset {path}: line {number} is not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise PersonascopeError(f"cannot read dataset {path}: line {number} is not a JSON object")
            chunk.append(row)
            if len(chunk) == chunk_rows:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def iter_samples(path: str | Path, chunk_rows: int = 1000) -> Iterator[tuple[list[ChatSample], list[BadRow]]]:
    """`load_samples` chunk by chunk: the usable samples and the left-out rows of each `chunk_rows` input rows
    (ids stay unique across chunks). Raises at the end when no row of the file was usable."""
    seen: set[str] = set()
    index, usable, reasons = 0, 0, set()
    for rows in iter_rows(path, chunk_rows):
        samples: list[ChatSample] = []
        bad: list[BadRow] = []
        for row in rows:
            item = to_sample(row, index)
            index += 1
            if isinstance(item, ChatSample) and item.id in seen:
                item = BadRow(item.id, "duplicate id")
            if isinstance(item, ChatSample):
                samples.append(item)
            else:
                bad.append(item)
                reasons.add(item.reason)
            seen.add(item.id)
        usable += len(samples)
        yield samples, bad
    if not usable:
        raise PersonascopeError(f"dataset {path} has no usable rows: {'; '.join(sorted(reasons) or ['the file has no rows'])}")


def load_samples(path: str | Path) -> tuple[list[ChatSample], list[BadRow]]:
    """Read a chat dataset; returns the usable samples and the rows left out with their reasons."""
    samples: list[ChatSample] = []
    bad: list[BadRow] = []
    for chunk, left_out in iter_samples(path):
        samples += chunk
        bad += left_out
    return samples, bad


def write_rows(rows: Iterable[dict[str, Any]], path: str | Path, *, inputs: Iterable[str | Path] = ()) -> Path:
    """Write rows as JSONL or Parquet (by extension), atomically; never over an input file."""
    path = check_output(path, inputs)

    def write(tmp: Path) -> None:
        if path.suffix.lower() == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as out:
                for row in rows:
                    out.write(encode(row))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(list(rows)), tmp)

    return atomic_write(path, write)
