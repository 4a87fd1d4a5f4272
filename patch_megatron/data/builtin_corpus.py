"""A small real text corpus that every Python 3.11 install already holds.

Tests and the quickstart need real text without downloads. Documents come from
``pydoc_data.topics`` (the language reference topics behind ``help()``), then
from the docstrings of the standard library's own ``.py`` modules (one document
per module: its module, class and function docstrings) and, when asked for
(``include_sources``, for multi-MB corpora), the modules' full source files.
Order is fixed (sorted
topic names, sorted module paths), so the same Python install gives the same
corpus byte for byte.

CLI: ``python -m patch_megatron.data.builtin_corpus OUTPUT.jsonl --max-bytes 1000000``
"""

import argparse
import ast
import json
import os
import sysconfig
from dataclasses import dataclass
from typing import Iterator, Optional

# Test suites and GUI code are mostly fixtures, not prose.
_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
                 "lib2to3", "turtledemo", "ensurepip"}
_TEST_DIRS = {"test"}
MIN_DOCUMENT_CHARS = 200


@dataclass(frozen=True)
class CorpusInfo:
    path: str
    documents: int
    text_bytes: int


def iter_builtin_documents(include_sources: bool = False, include_tests: bool = False) -> Iterator[str]:
    """Yield the corpus documents in their fixed order.

    ``include_tests`` adds the sources of the stdlib's own test suite after the
    rest (about 17 MB more real code, for benchmarks that need more data).
    """
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= MIN_DOCUMENT_CHARS:
            yield text
    for path in _stdlib_module_paths():
        text = _module_docstrings(path)
        if text is not None and len(text) >= MIN_DOCUMENT_CHARS:
            yield text
    if include_sources:
        for path in _stdlib_module_paths():
            text = _read_source(path)
            if text is not None and len(text) >= MIN_DOCUMENT_CHARS:
                yield text
    if include_tests:
        for path in _stdlib_module_paths(test_suites_only=True):
            text = _read_source(path)
            if text is not None and len(text) >= MIN_DOCUMENT_CHARS:
                yield text


def build_builtin_corpus(output_path: str, max_bytes: Optional[int] = 1_000_000,
                         json_key: str = "text", include_sources: bool = False,
                         include_tests: bool = False) -> CorpusInfo:
    """Write the corpus as ``.jsonl`` (one ``{json_key: text}`` object a line).

    Documents are taken whole, in order, until the next one would push the UTF-8
    size of the texts past ``max_bytes`` (None: no cap).
    """
    documents = text_bytes = 0
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as out:
        for text in iter_builtin_documents(include_sources, include_tests):
            size = len(text.encode("utf-8"))
            if max_bytes is not None and text_bytes + size > max_bytes:
                if documents == 0:
                    continue  # a cap smaller than the first document: try a shorter one
                break
            out.write(json.dumps({json_key: text}, ensure_ascii=False) + "\n")
            documents += 1
            text_bytes += size
    return CorpusInfo(path=output_path, documents=documents, text_bytes=text_bytes)


def _stdlib_module_paths(test_suites_only: bool = False) -> Iterator[str]:
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        if test_suites_only and directory == root:
            subdirs[:] = [d for d in subdirs if d in _TEST_DIRS]
            continue
        subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]
        found.extend(os.path.join(directory, f) for f in files if f.endswith(".py"))
    # Sort by path relative to the stdlib so the order is the same on any machine.
    return iter(sorted(found, key=lambda p: os.path.relpath(p, root)))


def _read_source(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as source:
            return source.read().strip()
    except (UnicodeDecodeError, OSError):
        return None


def _module_docstrings(path: str) -> Optional[str]:
    source = _read_source(path)
    try:
        tree = ast.parse(source) if source is not None else None
    except (SyntaxError, ValueError):
        return None
    if tree is None:
        return None
    parts = []
    for node in [tree] + [n for n in ast.walk(tree) if isinstance(
            n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            parts.append(doc.strip())
    return "\n\n".join(parts) if parts else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", help="output .jsonl path")
    parser.add_argument("--max-bytes", type=int, default=1_000_000,
                        help="cap on the UTF-8 size of the texts (default 1 MB; 0: no cap)")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--include-sources", action="store_true",
                        help="after the docstrings, add the stdlib modules' full sources")
    parser.add_argument("--include-tests", action="store_true",
                        help="then add the sources of the stdlib's test suite (more data for benchmarks)")
    args = parser.parse_args()
    info = build_builtin_corpus(args.output, args.max_bytes or None, args.json_key,
                                args.include_sources, args.include_tests)
    print(f"wrote {info.documents} documents, {info.text_bytes} bytes of text to {info.path}")


if __name__ == "__main__":
    main()
