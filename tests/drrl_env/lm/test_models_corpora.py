import math

import numpy as np
import pytest
import torch

from drrl_env.lm.corpora import load_corpus, sample_batch, sequential_chunks, split_of, tokenize_corpus
from drrl_env.lm.models import ModelNotAvailableError, load_causal_lm


def test_wiki_splits_are_disjoint_deterministic_and_nonempty():
    titles = {split: set(load_corpus("wiki", split)["title"]) for split in ("train", "validation", "test")}
    assert all(titles.values())
    assert not (titles["train"] & titles["test"]) and not (titles["train"] & titles["validation"])
    assert len(titles["train"]) > 5 * len(titles["test"])
    assert all(split_of(t) == "test" for t in titles["test"])
    text = " ".join(load_corpus("wiki", "test")["text"])
    assert "[[" not in text and "'''" not in text  # wiki markup removed


def test_evaluation_corpora_are_real_prose_and_test_only():
    news = load_corpus("news", "test")
    play = load_corpus("shakespeare", "test")
    assert len(news) > 250 and "bushfire" in news[0]["text"]
    assert any("MACBETH" in doc for doc in play["text"]) and "**" not in " ".join(play["text"])
    with pytest.raises(ValueError, match="evaluation-only"):
        load_corpus("news", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_corpus("wiki", "dev")


def test_local_text_file_corpus(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(f'{{"text": "document number {i}"}}' for i in range(200)))
    parts = [load_corpus(str(path), split) for split in ("train", "validation", "test")]
    assert sum(len(p) for p in parts) == 200 and all(len(p) for p in parts)


def test_local_txt_corpus_splits_by_paragraph_or_block(tmp_path):
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("\n\n".join(f"paragraph {i}, a line\nand another" for i in range(300)))
    parts = {split: load_corpus(str(paragraphs), split) for split in ("train", "validation", "test")}
    assert sum(len(p) for p in parts.values()) == 300 and all(len(p) for p in parts.values())
    assert parts["test"][0]["text"].startswith("paragraph ") and "\n\n" not in parts["test"][0]["text"]
    one_document = tmp_path / "novel.txt"  # no blank lines: cut into blocks of lines
    one_document.write_text("\n".join(f"line {i} of a long text" for i in range(1000)))
    blocks = {split: load_corpus(str(one_document), split) for split in ("train", "validation", "test")}
    assert sum(len(p) for p in blocks.values()) == 100 and all(len(p) for p in blocks.values())
    assert {line for p in blocks.values() for doc in p["text"] for line in doc.split("\n")} == set(
        one_document.read_text().split("\n")
    )


@pytest.mark.parametrize(
    "content, message",
    [(b"\x89PNG\r\n\x1a\n\x00\x00", "is binary"), (b"caf\xe9 au lait\n" * 5, "not UTF-8 text"), (b"  \n", "no text")],
)
def test_bad_local_text_files_are_named(content, message, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_corpus(str(path), "train")
    assert "bad.txt" in str(info.value)


def test_a_split_left_empty_is_an_error(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("\n".join(f'{{"text": "document {i}"}}' for i in range(3)))
    empty = next(s for s in ("train", "validation", "test") if s not in {split_of(str(i)) for i in range(3)})
    with pytest.raises(ValueError, match=f"leave split '{empty}' empty"):
        load_corpus(str(path), empty)


def test_model_folder_without_tokenizer_is_named(tmp_path):
    from tests.conftest import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "weights-only")
    with pytest.raises(ModelNotAvailableError, match="has no loadable tokenizer") as info:
        load_causal_lm(str(tmp_path / "weights-only"))
    assert "weights-only" in str(info.value) and "\n" not in str(info.value)


def test_unknown_corpus_offline_error():
    from drrl_env.lm.corpora import CorpusNotAvailableError

    with pytest.raises(CorpusNotAvailableError, match="offline default is 'wiki'"):
        load_corpus("no-such-user/no-such-dataset-drrl", "test")


def test_a_folder_or_a_file_without_suffix_gets_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="is a folder; give a text file"):
        load_corpus(str(tmp_path), "test")
    (tmp_path / "notes").write_text("some text\n\nmore text\n")
    with pytest.raises(ValueError, match="has no suffix; name it .txt"):
        load_corpus(str(tmp_path / "notes"), "test")


def test_unknown_model_offline_error_names_the_default():
    with pytest.raises(ModelNotAvailableError, match="offline default is 'smollm2-135m'") as info:
        load_causal_lm("no-such-user/no-such-model-drrl")
    assert "\n" not in str(info.value)


def test_batches_are_seeded_and_distinct():
    tokens = torch.arange(1000)
    a = sample_batch(tokens, 4, 50, np.random.default_rng(3))
    b = sample_batch(tokens, 4, 50, np.random.default_rng(3))
    assert torch.equal(a, b) and a.shape == (4, 50) and len(set(a[:, 0].tolist())) == 4
    assert sequential_chunks(tokens, 300).shape == (3, 300)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        sample_batch(tokens, 30, 50, np.random.default_rng(0))


@pytest.mark.expensive
def test_default_model_is_smollm2_and_its_perplexity_is_in_range(default_model):
    from drrl_env.lm.scoring import FixedRankHandler, evaluate_perplexity

    config = default_model.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    tokens = tokenize_corpus(load_corpus("wiki", "test"), default_model.tokenizer)
    assert 20_000 < tokens.numel() < 80_000
    chunks = sequential_chunks(tokens, 256, 1024)
    full = evaluate_perplexity(default_model, chunks)
    assert 10 < full.perplexity < 60, full.perplexity
    # the hook at full rank reproduces the model's own perplexity (no hook: HF's attention)
    default_model.model.set_attn_implementation("sdpa")
    own = evaluate_perplexity(default_model, chunks)
    default_model.model.set_attn_implementation("drrl")
    assert math.isclose(full.perplexity, own.perplexity, rel_tol=1e-4)
    at_64 = evaluate_perplexity(default_model, chunks, FixedRankHandler(64, "joint"))
    assert math.isclose(at_64.perplexity, own.perplexity, rel_tol=1e-3)
    separate_16 = evaluate_perplexity(default_model, chunks, FixedRankHandler(16, "separate"))
    joint_16 = evaluate_perplexity(default_model, chunks, FixedRankHandler(16, "joint"))
    assert own.perplexity < joint_16.perplexity < separate_16.perplexity
