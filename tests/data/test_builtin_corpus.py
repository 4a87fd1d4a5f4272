import json

from patch_megatron.data.builtin_corpus import build_builtin_corpus


def test_corpus_is_capped_deterministic_jsonl(tmp_path, builtin_corpus):
    again = build_builtin_corpus(str(tmp_path / "again.jsonl"), max_bytes=1_000_000)
    assert open(again.path, "rb").read() == open(builtin_corpus.path, "rb").read()
    texts = [json.loads(line)["text"] for line in open(again.path, encoding="utf-8")]
    assert len(texts) == again.documents > 50
    assert sum(len(t.encode()) for t in texts) == again.text_bytes <= 1_000_000
    assert any("def " in t or "class" in t for t in texts)
    small = build_builtin_corpus(str(tmp_path / "small.jsonl"), max_bytes=20_000)
    assert 0 < small.text_bytes <= 20_000
