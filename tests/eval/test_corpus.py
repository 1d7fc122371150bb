import pytest
import torch

from lowbit.eval.corpus import paragraphs, read_text_file, token_sequences, topics_split


def test_topics_split_deterministic_and_disjoint():
    from pydoc_data.topics import topics

    calib, evaluation = topics_split()
    assert topics_split() == (calib, evaluation)
    keys = sorted(topics)
    half = len(keys) // 2
    assert calib == "\n\n".join(topics[k] for k in keys[:half])
    assert evaluation == "\n\n".join(topics[k] for k in keys[half:])
    # every topic lands in exactly one half
    for k in keys:
        assert (topics[k] in calib) or (topics[k] in evaluation)
    assert topics[keys[0]] not in evaluation
    assert topics[keys[-1]] not in calib
    assert len(calib) > 100_000 and len(evaluation) > 100_000


class _CharTokenizer:
    """Minimal stand-in for a HF tokenizer: one token per character, optional BOS."""

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        ids = [ord(c) for c in text]
        if add_special_tokens:
            ids = [0] + ids
        return {"input_ids": ids}


def test_token_sequences_shape_and_content():
    text = "".join(chr(65 + i % 26) for i in range(5000))
    ids = token_sequences(_CharTokenizer(), text, n_tokens=4096, seq_len=512)
    assert ids.shape == (8, 512) and ids.dtype == torch.long
    # no special token, consecutive slices of the text
    assert ids[0, 0].item() == 65
    assert ids.flatten().tolist() == [ord(c) for c in text[:4096]]
    # n_tokens not a multiple of seq_len: whole sequences only
    assert token_sequences(_CharTokenizer(), text, n_tokens=1000, seq_len=300).shape == (3, 300)


def test_token_sequences_too_short():
    with pytest.raises(ValueError, match="only 10 tokens"):
        token_sequences(_CharTokenizer(), "x" * 10, n_tokens=64, seq_len=32)


def test_paragraphs():
    text = "short\n\n" + "a" * 81 + "\n\n  " + "b" * 80 + "  \n\n" + "c" * 200
    assert paragraphs(text) == ["a" * 81, "c" * 200]
    assert paragraphs(text, limit=1) == ["a" * 81]
    assert paragraphs(text, min_chars=0) == ["short", "a" * 81, "b" * 80, "c" * 200]


def test_paragraphs_of_evaluation_half():
    _, evaluation = topics_split()
    paras = paragraphs(evaluation)
    assert len(paras) == 512
    assert all(len(p) > 80 and p == p.strip() and "\n\n" not in p for p in paras)
    # repeated paragraphs of the documentation are kept, as in the QUALITY.md
    # measurement (deduplicating changes the neighbour metrics)
    assert len(set(paras)) == 469
    assert paras[0].startswith("Certain classes of identifiers")


def test_read_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("héllo world\n", encoding="utf-8")
    assert read_text_file(p) == "héllo world\n"
    with pytest.raises(FileNotFoundError, match="not found"):
        read_text_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_text_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="not a regular file"):
        read_text_file(tmp_path)
