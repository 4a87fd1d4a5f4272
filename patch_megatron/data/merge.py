"""Merge several megatron ``.bin/.idx`` prefixes into one, in the order given.

Uses megatron-core's ``IndexedDatasetBuilder.add_index``; every input is checked
first (same token dtype, well-formed files) and the result appears only when
complete (see ``atomic_output``).
"""

from dataclasses import dataclass
from typing import Sequence

from patch_megatron.data.atomic_output import AtomicIndexedOutput
from patch_megatron.data.index_validation import DatasetFileError, inspect_prefix


@dataclass(frozen=True)
class MergeSummary:
    output_prefix: str
    inputs: int
    documents: int
    tokens: int


def merge_prefixes(input_prefixes: Sequence[str], output_prefix: str) -> MergeSummary:
    if not input_prefixes:
        raise ValueError("give at least one input prefix to merge.")
    infos = [inspect_prefix(prefix, check_token_ids=False) for prefix in input_prefixes]
    dtypes = {info.dtype for info in infos}
    if len(dtypes) != 1:
        listing = ", ".join(f"{i.prefix}: {i.dtype.__name__}" for i in infos)
        raise DatasetFileError(f"inputs have different token dtypes ({listing}); they were "
                               f"made with different vocabulary sizes and cannot be merged.")
    if output_prefix in input_prefixes:
        raise ValueError(f"output prefix {output_prefix!r} is also an input.")
    output = AtomicIndexedOutput(output_prefix, dtypes.pop())
    try:
        for prefix in input_prefixes:
            output.add_index(prefix)
        output.finalize()
        output.publish()
    except BaseException:
        output.discard()
        raise
    return MergeSummary(output_prefix, len(infos), sum(i.document_count for i in infos),
                        sum(i.tokens for i in infos))
