"""Train a SentencePiece model on raw text, deterministically.

Special ids (fixed, so every model this project trains agrees):

======  ====  ======================================================
piece    id   use
======  ====  ======================================================
<pad>     0   padding; megatron-core's GPTDataset masks it in labels
<unk>     1   never produced for text: byte fallback covers every byte
<s>       2   BOS (not added by the GPT tokenizer path)
</s>      3   EOS = Megatron's EOD (``--append-eod`` appends it)
"\\n"      4   newline as a single piece (documents keep their lines)
======  ====  ======================================================

Text is kept as it is (``identity`` normalisation, extra whitespace kept), so
``decode(encode(text)) == text`` for any text. Training reads each non-empty
line of each document as one sentence; newlines become piece 4.
"""

import hashlib
import io
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NEWLINE_PIECE = "\n"
# SentencePiece drops longer training sentences; longer lines are cut to this size.
MAX_SENTENCE_BYTES = 4096


@dataclass(frozen=True)
class TrainingSummary:
    model_path: str
    vocab_path: str
    sentences_seen: int
    sentences_used: int
    seconds: float


def sample_sentences(documents: Iterable[str], max_sentences: Optional[int], seed: int,
                     progress_every: int = 0) -> tuple:
    """Split documents into line sentences; keep at most ``max_sentences`` of them.

    The cap uses reservoir sampling with a seeded generator, so a huge corpus is
    read once in flat memory and the same inputs always give the same sample
    (kept in corpus order). Returns ``(sentences, number_seen)``.
    """
    rng = random.Random(seed)
    reservoir: List[tuple] = []
    seen = 0
    started = time.time()
    for sentence in _sentences(documents):
        if max_sentences is None or len(reservoir) < max_sentences:
            reservoir.append((seen, sentence))
        else:
            slot = rng.randrange(seen + 1)
            if slot < max_sentences:
                reservoir[slot] = (seen, sentence)
        seen += 1
        if progress_every and seen % progress_every == 0:
            rate = seen / max(time.time() - started, 1e-9)
            print(f"read {seen} sentences ({rate:.0f}/s), keeping {len(reservoir)}",
                  file=sys.stderr, flush=True)
    reservoir.sort()
    return [sentence for _, sentence in reservoir], seen


def train_sentencepiece(documents: Iterable[str], output_prefix: str, vocab_size: int,
                        model_type: str = "bpe", max_sentences: Optional[int] = 2_000_000,
                        seed: int = 0, character_coverage: float = 0.9995,
                        byte_fallback: bool = True, progress_every: int = 100_000,
                        ) -> TrainingSummary:
    """Train and write ``output_prefix.model`` and ``output_prefix.vocab``.

    Deterministic: same documents and arguments give byte-identical files.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model type {model_type!r}: use 'bpe' or 'unigram'.")
    started = time.time()
    sentences, seen = sample_sentences(documents, max_sentences, seed, progress_every)
    if not sentences:
        raise ValueError("no text found in the inputs: nothing to train a tokenizer on.")
    minimum = 5 + (256 if byte_fallback else 0)
    if vocab_size <= minimum:
        raise ValueError(f"--vocab-size {vocab_size} is too small: the special pieces and "
                         f"the 256 byte pieces need {minimum}; use at least {minimum + 64}.")
    # SentencePiece's own sampling RNG is unused (we sample above), but pin it anyway.
    spm.set_random_generator_seed(_stable_seed(seed))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=byte_fallback,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            user_defined_symbols=[NEWLINE_PIECE], normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
            character_coverage=character_coverage, input_sentence_size=0,
            shuffle_input_sentence=False, max_sentence_length=MAX_SENTENCE_BYTES * 4,
            num_threads=1,  # one thread keeps the merge order, hence the files, reproducible
            hard_vocab_limit=False, minloglevel=2,
        )
    except RuntimeError as error:  # SentencePiece's C++ check, as one line with the fix
        message = str(error).strip().splitlines()[-1]
        required = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
        if required:
            raise ValueError(f"--vocab-size {vocab_size} is smaller than the "
                             f"{required.group(2)} characters and special pieces the inputs "
                             f"need; use a larger --vocab-size or a lower "
                             f"--character-coverage.") from None
        raise ValueError(f"SentencePiece could not train on these inputs: {message}") from None
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if processor.get_piece_size() != vocab_size:
        # hard_vocab_limit=False lets SentencePiece stop early on a small corpus; the
        # model's vocabulary must be the one asked for (it sizes the embedding).
        raise ValueError(f"--vocab-size {vocab_size}: the inputs ({len(sentences)} lines) "
                         f"give only {processor.get_piece_size()} pieces. Train on more "
                         f"text, or ask for --vocab-size {processor.get_piece_size()} or "
                         f"less. Nothing was written.")
    model_path, vocab_path = output_prefix + ".model", output_prefix + ".vocab"
    with open(model_path, "wb") as out:
        out.write(model.getvalue())
    with open(vocab_path, "w", encoding="utf-8") as out:
        for piece_id in range(processor.get_piece_size()):
            piece = processor.id_to_piece(piece_id).replace("\n", "\\n")
            out.write(f"{piece}\t{processor.get_score(piece_id):g}\n")
    return TrainingSummary(model_path, vocab_path, seen, len(sentences), time.time() - started)


def _sentences(documents: Iterable[str]) -> Iterator[str]:
    for document in documents:
        for line in document.split("\n"):
            if line.strip():
                yield line[:MAX_SENTENCE_BYTES]


def _stable_seed(seed: int) -> int:
    return int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:4], "little") or 1
