"""Find input files and read documents from them, without decoding in the reader.

Formats (chosen by file name; a ``.gz`` suffix means gzip):

* ``.jsonl`` / ``.json``: one JSON object a line; the text is under each of the
  ``--json-keys``. Whitespace-only lines are ignored.
* ``.txt``: one document per block of lines separated by one or more blank
  (whitespace-only) lines. The document text is the block's lines joined with
  ``"\\n"`` (line endings normalised, no trailing newline). Its one field is named
  by the first ``--json-keys`` entry (``text`` by default).

Reading yields raw bytes with the file and first line number, so decoding,
JSON parsing and tokenizing can run in worker processes; :func:`parse_record`
does that part and raises :class:`BadRecordError` naming what is wrong.
"""

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)


class BadRecordError(ValueError):
    """A document that cannot be used; ``str()`` names the file and line."""

    def __init__(self, path: str, line: int, reason: str, kind: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason, self.kind = path, line, reason, kind

    def __reduce__(self):
        # Workers send these back to the parent; rebuild from the fields.
        return (BadRecordError, (self.path, self.line, self.reason, self.kind))


@dataclass(frozen=True)
class RawRecord:
    path: str
    line: int  # 1-based line number where the document starts
    payload: bytes


def input_format(path: str) -> str:
    """'jsonl' or 'txt' from the file name (a trailing .gz is ignored)."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    raise ValueError(f"{path}: unknown input format; name files .jsonl, .jsonl.gz, .json, "
                     f".txt or .txt.gz.")


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Files named by paths, directories (searched recursively) and globs, in a fixed order."""
    files: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(directory, name)
                for directory, _, names in os.walk(pattern) for name in names
                if _is_supported(name))
            if not found:
                raise ValueError(f"{pattern}: directory holds no .jsonl/.jsonl.gz/.txt files.")
        elif os.path.isfile(pattern):
            input_format(pattern)
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not found:
                raise ValueError(f"{pattern}: no such file, directory or glob match.")
            for path in found:
                input_format(path)
        files.extend(p for p in found if p not in files)
    return files


def iter_raw_records(path: str) -> Iterator[RawRecord]:
    """Yield the documents of one file as undecoded bytes.

    A damaged or truncated ``.gz`` raises ValueError naming the file and the last
    line read (it is not a bad record: --skip-bad-lines cannot skip it).
    """
    if not path.endswith(".gz"):
        yield from _records(path, open(path, "rb"))
        return
    last = 0
    try:
        for record in _records(path, gzip.open(path, "rb")):
            last = record.line
            yield record
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        what = ("ends before its end-of-stream marker: it is truncated"
                if isinstance(err, EOFError) else f"is damaged or not gzip ({err})")
        where = f" after the document at line {last}" if last else ""
        raise ValueError(f"{path}: compressed file {what}{where}. Fetch or copy the file "
                         f"again, or decompress what is there and pass that instead.") from None


def _records(path: str, stream) -> Iterator[RawRecord]:
    with stream:
        if input_format(path) == "jsonl":
            for number, line in enumerate(stream, start=1):
                if line.strip():
                    yield RawRecord(path, number, line)
        else:
            yield from _text_blocks(path, stream)


def parse_record(record: RawRecord, fmt: str, json_keys: Sequence[str]) -> Dict[str, object]:
    """Decode one raw record into ``{key: text or list of sentences}``."""
    try:
        text = record.payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecordError(record.path, record.line,
                             f"invalid UTF-8 at byte {err.start} of the document",
                             "invalid_utf8") from None
    if fmt == "txt":
        return {json_keys[0]: text}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRecordError(record.path, record.line, f"malformed JSON ({err.msg} at column "
                             f"{err.colno})", "malformed_json") from None
    if not isinstance(data, dict):
        raise BadRecordError(record.path, record.line,
                             f"expected a JSON object, got {type(data).__name__}",
                             "malformed_json")
    fields = {}
    for key in json_keys:
        if key not in data:
            raise BadRecordError(record.path, record.line,
                                 f"missing key {key!r} (keys present: {sorted(data)[:8]})",
                                 "missing_key")
        value = data[key]
        # A list is a pre-split document (Megatron-LM's --split-sentences output).
        if not (isinstance(value, str) or
                (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise BadRecordError(record.path, record.line,
                                 f"key {key!r} holds {type(value).__name__}, not text",
                                 "not_text")
        fields[key] = value
    return fields


def _is_supported(name: str) -> bool:
    try:
        input_format(name)
        return True
    except ValueError:
        return False


def _text_blocks(path: str, stream) -> Iterator[RawRecord]:
    lines: List[bytes] = []
    start = 0
    for number, line in enumerate(stream, start=1):
        if line.strip():
            if not lines:
                start = number
            lines.append(line.rstrip(b"\r\n"))
        elif lines:
            yield RawRecord(path, start, b"\n".join(lines))
            lines = []
    if lines:
        yield RawRecord(path, start, b"\n".join(lines))
