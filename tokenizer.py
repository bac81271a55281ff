"""Stage 1: a byte-level BPE tokenizer that trains fast and encodes exactly like GPT-2.

A language model reads integers, not text. This stage turns text into ids and back, in the order
the CS336 lecture teaches it:
  1. baselines: characters, bytes and words, and how much each compresses (UTF-8 bytes per token);
  2. train_bpe: byte-pair encoding learned from a file, pre-tokenized in parallel, merged with
     incremental pair counts;
  3. Tokenizer: encode / encode_iterable / decode with a vocabulary, its merges and special tokens;
  4. GPT-2 compatibility: GPT-2's own vocab.json and merges.txt give tiktoken's ids (exactly,
     up to characters that Unicode assigned after tiktoken's regex tables were built);
  5. encode_file: a whole corpus to a flat token array (.bin) that train.py memory-maps.

Commands (CPU only; nothing here uses a GPU):
  python tokenizer.py train --input ../shared/data/tinyshakespeare.txt --vocab-size 10000 \
      --special-token '<|endoftext|>' --out out/tok_shakespeare
  python tokenizer.py encode --tokenizer out/tok_shakespeare \
      --input ../shared/data/tinyshakespeare.txt --out out/shakespeare.bin
  python tokenizer.py compare ../shared/data/tinyshakespeare.txt
  python tokenizer.py bench        # ours next to HuggingFace tokenizers and tiktoken

Reads a UTF-8 text file; bench and compare also read ../shared/data/ (GPT-2's gpt2_vocab.json and
gpt2_merges.txt, tinyshakespeare.txt, corpus.en).
Writes DIR/vocab.json, DIR/merges.txt, DIR/special_tokens.json (train) and FILE.bin with its
sidecar FILE.bin.json = {"dtype", "vocab_size", "num_tokens", "tokenizer": fingerprint} (encode).

Ids of a trained tokenizer: 0-255 are the single bytes (id = byte value), then the merges in the
order they were learned, then the special tokens, so `vocab_size = 256 + merges + specials`.
A tokenizer loaded from files keeps the file's ids (GPT-2: bytes in its own order, 50256 = eos).

Papers: Sennrich, Haddow, Birch 2016, "Neural Machine Translation of Rare Words with Subword
Units" (BPE for language); Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners" (GPT-2: byte-level BPE and its pre-tokenization regex).
"""

import argparse
import ast
import contextlib
import difflib
import hashlib
import heapq
import json
import math
import multiprocessing
import operator
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from itertools import chain, repeat
from pathlib import Path

import numpy as np
import regex
from tqdm import tqdm

# GPT-2's pre-tokenizer: a contraction, or a run of letters, digits or punctuation (each may take
# one leading space), or a run of whitespace that leaves its last space to the next word.
# BPE never merges across two pre-tokens, so " the" and "the" stay different tokens, not " t"+"he".
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN_RE = regex.compile(GPT2_PAT)
DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data"  # the shared corpora
CHUNK_BYTES = 4 << 20  # a process reads a file this much at a time: bounds memory per process
STREAM_CHARS = 1 << 20  # encode_iterable encodes its buffer each time it holds this many chars
CACHE_ENTRIES = 100_000  # pre-token -> ids cache per tokenizer; cleared when full (bounded memory)


# ----------------------------------------------------------------------------------------------
# 1. Baselines: characters, bytes, words


class CharTokenizer:
    """One id per Unicode code point: nothing to learn, but ids up to 0x10FFFF, mostly unused."""

    vocab_size = 0x110000

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(map(chr, ids))


class ByteTokenizer:
    """One id per UTF-8 byte: 256 ids cover every text, but sequences are the longest."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class WordTokenizer:
    """One id per word (GPT-2 pre-token) seen in training; any other word becomes <unk> (id 0).

    Short sequences, but the vocabulary grows with the corpus and unseen words are lost for good:
    the problem BPE solves by falling back to smaller pieces, down to single bytes.
    """

    def __init__(self, training_text: str):
        self.id_to_word = ["<unk>"] + sorted(set(PRETOKEN_RE.findall(training_text)))
        self.word_to_id = {word: i for i, word in enumerate(self.id_to_word)}
        self.vocab_size = len(self.id_to_word)

    def encode(self, text: str) -> list[int]:
        return [self.word_to_id.get(word, 0) for word in PRETOKEN_RE.findall(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.id_to_word[i] for i in ids)


def compression_ratio(text: str, tokenizer) -> float:
    """UTF-8 bytes per token: higher means shorter sequences, so more text per context window."""
    return len(text.encode("utf-8")) / max(1, len(tokenizer.encode(text)))


# ----------------------------------------------------------------------------------------------
# Reading big files in pieces. Training and file encoding cut a file into chunks that separate
# processes handle; a cut must change nothing. A cut before text[c] is safe when
#   (1) text[c-1] is not whitespace and text[c] is: no GPT-2 pre-token contains that pair, and
#       every pattern that looked at text[c] (the end of a letter, digit or punctuation run, the
#       letter after an apostrophe, the `(?!\S)` look-ahead) decides the same at the end of text;
#   (2) no special token occurs within its length of c, so no special token spans the cut.
# The course cuts only at "<|endoftext|>"; this rule also cuts files that have no special tokens.

_ASCII_SPACE = regex.compile(rb"[\t\n\x0b\x0c\r ]")  # files are cut only before these bytes
_LAST_CUT = regex.compile(r"(?r)\S\s")  # (?r) searches backwards: the last candidate comes first
_WHITESPACE = regex.compile(r"\s")


def _is_cut(data: bytes, j: int, specials: Sequence[bytes]) -> bool:
    """Whether cutting data before byte j (ASCII whitespace) is safe (rule above)."""
    start = j - 1
    while start > max(0, j - 4) and 0x80 <= data[start] < 0xC0:  # UTF-8 continuation bytes
        start -= 1
    try:
        previous = data[start:j].decode("utf-8")
    except UnicodeDecodeError:  # leave invalid bytes whole: the reader reports them
        return False
    if not previous or _WHITESPACE.match(previous):
        return False
    longest = max(map(len, specials), default=0)
    window = data[max(0, j - longest) : j + longest]
    return not any(s in window for s in specials)


def _next_cut(f, pos: int, size: int, specials: Sequence[bytes], window: int = 1 << 16) -> int:
    """The first safe cut at or after byte pos of the open file f, or size if there is none."""
    context = max(4, max(map(len, specials), default=0))  # bytes needed around a candidate
    while pos < size:
        base = max(0, pos - context)
        f.seek(base)
        data = f.read(pos + window + context - base)
        for match in _ASCII_SPACE.finditer(data, pos - base, pos + window - base):
            if match.start() > 0 and _is_cut(data, match.start(), specials):
                return base + match.start()
        pos += window
    return size


def _chunk_bounds(path: Path, num_chunks: int, specials: Sequence[bytes]) -> list[int]:
    """Byte offsets [0, ..., size] cutting the file into about num_chunks safe chunks."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        for i in range(1, num_chunks):
            cut = _next_cut(f, max(size * i // num_chunks, bounds[-1] + 1), size, specials)
            if cut >= size:  # no safe cut left: later scans would only re-read the same tail
                break
            bounds.append(cut)
    return bounds + [size]


def _num_chunks(size: int, num_workers: int) -> int:
    """A multiple of the worker count, each chunk at most about CHUNK_BYTES."""
    return num_workers * max(1, math.ceil(size / (num_workers * CHUNK_BYTES)))


def _default_workers(size: int) -> int:
    """One process per chunk up to the core count: a small file is not worth starting processes."""
    return max(1, min(os.cpu_count() or 1, math.ceil(size / CHUNK_BYTES)))


def _check_input(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"input file is empty: {path}")
    return path


def _read_text(path: str | os.PathLike, start: int, end: int) -> str:
    """Bytes [start, end) of a file as text; invalid UTF-8 is an error naming file and offset."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not valid UTF-8 at byte offset {start + e.start} ({e.reason})"
        ) from None


def _pool(num_workers: int, initializer: Callable | None = None, initargs: tuple = ()):
    # On Linux, fork starts a worker in milliseconds and hands it the tokenizer without pickling;
    # spawn re-imports this file and unpickles the tokenizer in every worker (about 1 s here).
    # Fork's hazard, a lock held by another thread of the parent, cannot bite: the workers only
    # run regex and numpy code on their own data.
    method = "fork" if sys.platform == "linux" else "spawn"
    return multiprocessing.get_context(method).Pool(num_workers, initializer, initargs)


def _special_re(special_tokens: Sequence[str]) -> regex.Pattern | None:
    """Matches any special token; longer ones are tried first, so the longest overlap wins."""
    if not special_tokens:
        return None
    by_length = sorted(special_tokens, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(s) for s in by_length))


def _check_specials(special_tokens: Iterable[str] | None) -> list[str]:
    if isinstance(special_tokens, (str, bytes)):  # list("<|endoftext|>") would be its characters
        raise TypeError(f"special_tokens must be a list of strings, e.g. [{special_tokens!r}]")
    specials = list(dict.fromkeys(special_tokens or []))  # drop repeats, keep the order
    for s in specials:
        if not isinstance(s, str) or not s:
            raise ValueError(f"special tokens must be non-empty strings, got {s!r}")
    return specials


# ----------------------------------------------------------------------------------------------
# 2. Training byte-level BPE


def merge(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of pair in ids, left to right, by new_id."""
    first, second = pair
    out = []
    i = 0
    last = len(ids) - 1
    while i < last:
        if ids[i] == first and ids[i + 1] == second:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    if i == last:  # the last id was not consumed by a merge
        out.append(ids[last])
    return out


def _count_pretokens(path: str, start: int, end: int, special_tokens: list[str]) -> Counter:
    """How often each pre-token occurs in bytes [start, end) of the file (a worker's job)."""
    text = _read_text(path, start, end)
    splitter = _special_re(special_tokens)
    counts = Counter()
    # special tokens cut the text first and are dropped, so no merge ever touches them
    for segment in splitter.split(text) if splitter else [text]:
        counts.update(PRETOKEN_RE.findall(segment))
    return counts


def _count_pretokens_job(job: tuple) -> Counter:
    return _count_pretokens(*job)


def count_pretokens(path: Path, special_tokens: list[str], num_workers: int | None = None,
                    progress: bool = True) -> Counter:
    """Pre-token counts of a whole file, streamed chunk by chunk through a pool of processes."""
    size = path.stat().st_size
    num_workers = num_workers or _default_workers(size)
    specials = [s.encode("utf-8") for s in special_tokens]
    bounds = _chunk_bounds(path, _num_chunks(size, num_workers), specials)
    jobs = [(str(path), a, b, special_tokens) for a, b in zip(bounds, bounds[1:])]
    counts = Counter()
    with contextlib.ExitStack() as stack:
        if num_workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(_pool(min(num_workers, len(jobs))))
            chunks = pool.imap_unordered(_count_pretokens_job, jobs)
        else:
            chunks = map(_count_pretokens_job, jobs)
        for chunk in tqdm(chunks, total=len(jobs), desc="pre-tokenize", disable=not progress):
            counts.update(chunk)
    return counts


def _reverse_key(token: bytes) -> tuple[int, ...]:
    """A key that sorts tokens in reverse byte order: a min-heap then pops the greatest first.

    Each byte is negated; the final 1 is larger than any negated byte, so a prefix (b"a" < b"ab")
    sorts after the longer token, as the reversal requires.
    """
    return tuple(-b for b in token) + (1,)


def bpe_merges(words: list[list[int]], freqs: list[int], vocab: dict[int, bytes],
               num_merges: int, progress: bool = True) -> list[tuple[bytes, bytes]]:
    """Learn up to num_merges merges from distinct words (as ids) and their frequencies.

    The naive algorithm recounts every pair of every word after each merge. Here the pair counts
    live in a dict updated only for the words that contain the merged pair, and a heap finds the
    most frequent pair. pair_words lists the words where a pair was ever seen; a word that lost
    the pair to an earlier merge is skipped (cheaper than keeping the lists exact). Heap entries
    go stale when counts change: entries that are too high are refiled with the true count when
    they reach the top, and every increase pushes a new entry, so the top is always right.
    Adds the new tokens to vocab.
    """
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(w)
    pair_counts = dict(pair_counts)
    reverse = [_reverse_key(vocab[i]) for i in range(len(vocab))]
    # ties between equal counts go to the lexicographically greater pair (as bytes)
    heap = [(-count, reverse[a], reverse[b], a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    for _ in tqdm(range(num_merges), desc="merges", disable=not progress):
        while heap:
            neg_count, _, _, a, b = heap[0]
            count = pair_counts.get((a, b))
            if count == -neg_count:
                break
            if count is None:  # the pair no longer occurs anywhere
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (-count, reverse[a], reverse[b], a, b))
        else:
            break  # every word is a single token: nothing left to merge
        heapq.heappop(heap)
        new_id = len(vocab)
        vocab[new_id] = vocab[a] + vocab[b]
        reverse.append(_reverse_key(vocab[new_id]))
        merges.append((vocab[a], vocab[b]))
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for w in pair_words.pop((a, b)):
            word = words[w]
            new_word = merge(word, (a, b), new_id)
            if len(new_word) == len(word):
                continue  # an earlier merge took the pair from this word
            words[w] = new_word
            freq = freqs[w]
            for pair in zip(word, word[1:]):
                delta[pair] -= freq
            for pair in zip(new_word, new_word[1:]):
                delta[pair] += freq
                if new_id in pair:
                    pair_words[pair].add(w)
        for pair, change in delta.items():
            if change == 0:
                continue
            count = pair_counts.get(pair, 0) + change
            if count > 0:
                pair_counts[pair] = count
                if change > 0:
                    heapq.heappush(heap, (-count, reverse[pair[0]], reverse[pair[1]], *pair))
            else:
                del pair_counts[pair]
                pair_words.pop(pair, None)
    return merges


def train_bpe(input_path: str | os.PathLike, vocab_size: int, special_tokens: list[str],
              num_workers: int | None = None,
              progress: bool = True) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE on a UTF-8 file: (vocab id -> bytes, merges in creation order).

    Ids 0-255 are the bytes, then one id per merge, then the special tokens. If the corpus runs
    out of pairs first, the vocabulary is smaller than vocab_size.
    """
    special_tokens = _check_specials(special_tokens)
    num_merges = vocab_size - 256 - len(special_tokens)
    if num_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the 256 bytes plus "
                         f"{len(special_tokens)} special tokens")
    path = _check_input(input_path)
    counts = count_pretokens(path, special_tokens, num_workers, progress)
    words = [list(pretoken.encode("utf-8")) for pretoken in counts]
    vocab = {i: bytes([i]) for i in range(256)}
    merges = bpe_merges(words, list(counts.values()), vocab, num_merges, progress)
    for s in special_tokens:
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab, merges


# ----------------------------------------------------------------------------------------------
# 3. The tokenizer: encode, encode_iterable, decode

_REPLACEMENT = "\N{REPLACEMENT CHARACTER}".encode("utf-8")  # what decode gives for an unknown id
_NO_MERGE = 1 << 62  # the rank of a pair that has no merge: after every real rank


LONG_PRETOKEN = 64  # characters; longer pre-tokens take _bpe_reference's linear-per-merge path


class _PretokenCache(dict):
    """pre-token -> ids; a missing pre-token is encoded once. Cleared when full: bounded memory."""

    def __init__(self, bpe: Callable[[str], list[int]]):
        super().__init__()
        self.bpe = bpe

    def __missing__(self, pretoken: str) -> list[int]:
        if len(self) >= CACHE_ENTRIES:
            self.clear()
        ids = self[pretoken] = self.bpe(pretoken)
        return ids


class Tokenizer:
    """Byte-level BPE with a vocabulary (id -> bytes), its merges and special tokens.

    Special tokens are kept whole; when two overlap, the one found first in the text wins, and at
    the same place the longest. Special tokens missing from vocab get the next ids.
    """

    def __init__(self, vocab: dict[int, bytes], merges: Iterable[tuple[bytes, bytes]],
                 special_tokens: Iterable[str] | None = None):
        self.vocab = {int(i): bytes(token) for i, token in vocab.items()}
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]
        self.special_tokens = _check_specials(special_tokens)
        self._ids: dict[bytes, int] = {}
        for i in sorted(self.vocab):  # a token that occurs twice keeps its lowest id
            self._ids.setdefault(self.vocab[i], i)
        for s in self.special_tokens:
            if s.encode("utf-8") not in self._ids:
                self._ids[s.encode("utf-8")] = len(self.vocab)
                self.vocab[len(self.vocab)] = s.encode("utf-8")
        if sorted(self.vocab) != list(range(len(self.vocab))):
            raise ValueError(f"vocabulary ids must be 0..{len(self.vocab) - 1} without gaps")
        missing = [b for b in range(256) if bytes([b]) not in self._ids]
        if missing:
            raise ValueError(f"vocabulary lacks {len(missing)} of the 256 single bytes, e.g. "
                             f"{missing[0]:#04x}")
        self._byte_ids = [self._ids[bytes([b])] for b in range(256)]
        self._ranks: dict[tuple[int, int], int] = {}  # pair of ids -> rank (merge order)
        self._merged_id: list[int] = []  # rank -> id of the merged token
        for rank, (a, b) in enumerate(self.merges):
            if a not in self._ids or b not in self._ids or a + b not in self._ids:
                raise ValueError(f"merge {rank} ({a!r}, {b!r}) uses a token not in the vocabulary")
            self._ranks.setdefault((self._ids[a], self._ids[b]), rank)
            self._merged_id.append(self._ids[a + b])
        self._special_ids = {s: self._ids[s.encode("utf-8")] for s in self.special_tokens}
        self._special_re = _special_re(self.special_tokens)
        self._longest_special = max(map(len, self.special_tokens), default=0)
        self._cache = _PretokenCache(self._bpe)

    def __getstate__(self) -> dict:  # pickled for worker processes: the cache stays behind
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache = _PretokenCache(self._bpe)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_id(self, special_token: str) -> int:
        """The id of a special token, e.g. tokenizer.token_id("<|endoftext|>")."""
        if special_token not in self._special_ids:
            raise ValueError(f"{special_token!r} is not a special token of this tokenizer; "
                             f"its special tokens are {self.special_tokens}")
        return self._special_ids[special_token]

    def fingerprint(self) -> str:
        """A short hash of vocabulary, merges and special tokens: ties a .bin to its tokenizer."""
        h = hashlib.sha256()
        for i in range(len(self.vocab)):
            h.update(self.vocab[i].hex().encode() + b"\n")
        for a, b in self.merges:
            h.update(a.hex().encode() + b" " + b.hex().encode() + b"\n")
        h.update(json.dumps(self.special_tokens).encode())
        return h.hexdigest()[:16]

    def _bpe_reference(self, pretoken: str) -> list[int]:
        """Merge one pre-token's bytes: the pair of lowest rank (learned first) merges first."""
        ids = [self._byte_ids[b] for b in pretoken.encode("utf-8")]
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: self._ranks.get(p, _NO_MERGE))
            if pair not in self._ranks:
                break
            ids = merge(ids, pair, self._merged_id[self._ranks[pair]])
        return ids

    def _bpe(self, pretoken: str) -> list[int]:
        """_bpe_reference, about twice as fast on words: merges one pair at a time, updating only
        its neighbours. Each merge scans the pair ranks, so it is quadratic in the length: long
        pre-tokens (a run of '=' or digits of base64) go to the reference, which merges all
        occurrences of a pair in one pass.

        Same ids as long as no merge creates a pair that ranks before it, which holds for merges
        that training produced (a token exists before any merge that uses it) and for GPT-2's.
        """
        if len(pretoken) > LONG_PRETOKEN:
            return self._bpe_reference(pretoken)
        ids = list(map(self._byte_ids.__getitem__, pretoken.encode("utf-8")))
        rank_of, merged_id = self._ranks.get, self._merged_id
        # ranks[i] is the rank of the pair (ids[i], ids[i + 1]); map(...) runs in C
        ranks = list(map(rank_of, zip(ids, ids[1:]), repeat(_NO_MERGE)))
        while ranks:
            rank = min(ranks)
            if rank == _NO_MERGE:
                break
            i = ranks.index(rank)  # the leftmost occurrence, as merge() would go left to right
            ids[i] = merged_id[rank]
            del ids[i + 1], ranks[i]
            if i > 0:
                ranks[i - 1] = rank_of((ids[i - 1], ids[i]), _NO_MERGE)
            if i < len(ranks):
                ranks[i] = rank_of((ids[i], ids[i + 1]), _NO_MERGE)
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        """Encode text without special tokens; most pre-tokens repeat, so their ids are cached."""
        pretokens = PRETOKEN_RE.findall(text)
        # the cache's __getitem__ and the chaining run in C; only a miss calls back into Python
        return list(chain.from_iterable(map(self._cache.__getitem__, pretokens)))

    def encode(self, text: str) -> list[int]:
        if self._special_re is None:
            return self._encode_ordinary(text)
        ids = []
        start = 0
        for match in self._special_re.finditer(text):
            ids += self._encode_ordinary(text[start : match.start()])
            ids.append(self._special_ids[match.group()])
            start = match.end()
        return ids + self._encode_ordinary(text[start:])

    def _last_cut(self, text: str) -> int:
        """The last position c where ids(text[:c]) + ids(text[c:] + more) == ids(text + more).

        The rule of _is_cut, on text: c must leave room for a special token after it, to see
        that none spans c. Returns 0 when there is no such position.
        """
        longest = self._longest_special
        if len(text) < longest:  # a negative endpos would count from the end
            return 0
        for match in _LAST_CUT.finditer(text, 0, len(text) - longest + 1):
            cut = match.start() + 1
            if self._special_re is None or not self._special_re.search(
                    text, max(0, cut - longest), cut + longest):
                return cut
        return 0

    def encode_iterable(self, iterable: Iterable[str],
                        buffer_chars: int = STREAM_CHARS) -> Iterator[int]:
        """Encode a stream of strings (e.g. an open file's lines) lazily, in bounded memory.

        The buffer is encoded up to its last safe cut, so the ids equal encode("".join(...)).
        """
        pending: list[str] = []
        size = 0
        limit = buffer_chars
        for piece in iterable:
            pending.append(piece)
            size += len(piece)
            if size >= limit:
                text = "".join(pending)
                cut = self._last_cut(text)
                yield from self.encode(text[:cut])
                pending, size = [text[cut:]], len(text) - cut
                # a text with no cut (one enormous pre-token) doubles the buffer, not O(n^2)
                limit = max(buffer_chars, 2 * size)
        yield from self.encode("".join(pending))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to text; bytes that are not valid UTF-8 and unknown ids become U+FFFD."""
        if hasattr(ids, "tolist"):  # numpy arrays, torch tensors
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"decode takes token ids, got {type(ids).__name__}")
        data = b"".join(self.vocab.get(operator.index(i), _REPLACEMENT) for i in ids)
        return data.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------------------------------
    # 4. Files: GPT-2's format, and ours

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
                   special_tokens: Iterable[str] | None = None) -> "Tokenizer":
        """Load a vocab.json and merges.txt in GPT-2's format or ours (told apart by vocab.json)."""
        special_tokens = _check_specials(special_tokens)
        return cls(_read_vocab(vocab_path, special_tokens), _read_merges(merges_path),
                   special_tokens)

    def save(self, vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
             gpt2_format: bool = False) -> None:
        """Write vocab.json and merges.txt, each atomically.

        Both formats write tokens through GPT-2's byte-to-unicode table and the same merges.txt;
        ours maps id -> token, GPT-2's maps token -> id, which cannot hold two ids with the same
        bytes (BPE training can create such a pair), so ours is the default.
        """
        if gpt2_format:
            vocab_json = {_to_text(token): i for i, token in sorted(self.vocab.items())}
            if len(vocab_json) != len(self.vocab):
                raise ValueError("two ids have the same bytes; GPT-2's vocab.json cannot hold "
                                 "that, save with gpt2_format=False")
        else:
            vocab_json = {str(i): _to_text(token) for i, token in sorted(self.vocab.items())}
        merges_txt = "".join(f"{_to_text(a)} {_to_text(b)}\n" for a, b in self.merges)
        write_atomic(vocab_path, json.dumps(vocab_json, ensure_ascii=False, indent=0))
        write_atomic(merges_path, "#version: 0.2\n" + merges_txt)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load what save_dir (and `python tokenizer.py train --out DIR`) wrote."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        specials_path = path / "special_tokens.json"
        special_tokens = []
        if specials_path.exists():
            special_tokens = _read_json(specials_path)
            if not isinstance(special_tokens, list):
                raise ValueError(f"{specials_path}: expected a JSON list of strings")
        return cls.from_files(path / "vocab.json", path / "merges.txt", special_tokens)

    def save_dir(self, path: str | os.PathLike, gpt2_format: bool = False) -> None:
        """Write DIR/vocab.json, DIR/merges.txt and DIR/special_tokens.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.save(path / "vocab.json", path / "merges.txt", gpt2_format)
        write_atomic(path / "special_tokens.json", json.dumps(self.special_tokens))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to a printable character, so tokens can be written as text.

    Printable Latin-1 bytes stand for themselves; the others (controls, space) are shifted to
    characters from U+0100 on, which is why a space shows up as "Ġ" in GPT-2's files.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _to_text(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def _from_text(text: str, where: str) -> bytes:
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in text)
    except KeyError as e:
        raise ValueError(f"{where}: {text!r} has {e.args[0]!r}, which is not in GPT-2's "
                         "byte-to-unicode table") from None


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _read_vocab(path: str | os.PathLike, special_tokens: list[str]) -> dict[int, bytes]:
    raw = _read_json(Path(path))
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON object")
    if all(type(v) is int for v in raw.values()):  # GPT-2's: token -> id
        # HF writes added (special) tokens as they are, not byte-encoded
        vocab = {i: token.encode("utf-8") if token in special_tokens
                 else _from_text(token, f"{path}") for token, i in raw.items()}
        if len(vocab) != len(raw):
            raise ValueError(f"{path}: two tokens have the same id")
        return vocab
    if all(type(v) is str for v in raw.values()) and all(k.isdigit() for k in raw):  # ours
        return {int(i): _from_text(token, f"{path}, id {i}") for i, token in raw.items()}
    raise ValueError(f"{path}: expected token -> id (GPT-2's vocab.json) or id -> token (ours)")


def _read_merges(path: str | os.PathLike) -> list[tuple[bytes, bytes]]:
    merges = []
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{path}, line {number}: expected two tokens separated by one "
                             f"space, got {line!r}")
        where = f"{path}, line {number}"
        merges.append((_from_text(parts[0], where), _from_text(parts[1], where)))
    return merges


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on any
    error (Ctrl-C too) it is deleted. The name is fixed, so a temp file that a killed process
    (kill -9) left behind is simply overwritten by the next write of the same file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a whole file so that a crash leaves the old file or the new one, never half."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


# ----------------------------------------------------------------------------------------------
# 5. Encoding a corpus into a token array


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype for ids below vocab_size: half the disk and reads of int32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32")


def _encode_chunk(tokenizer: Tokenizer, path: str, start: int, end: int,
                  dtype: np.dtype) -> np.ndarray:
    return np.array(tokenizer.encode(_read_text(path, start, end)), dtype=dtype)


_worker_tokenizer: Tokenizer | None = None  # each pool process receives the tokenizer once


def _init_encode_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_chunk_job(job: tuple) -> np.ndarray:
    return _encode_chunk(_worker_tokenizer, *job)


def encode_file(tokenizer: Tokenizer, input_path: str | os.PathLike, out_path: str | os.PathLike,
                num_workers: int | None = None, progress: bool = True) -> int:
    """Encode a UTF-8 file to a flat token_dtype array at out_path; returns the token count.

    Chunks cut at safe places (see _is_cut) go to a pool of processes; their ids, written in
    order as they arrive, equal encoding the whole file at once. Writes out_path.json next to
    it: {"dtype", "vocab_size", "num_tokens", "tokenizer": tokenizer.fingerprint()}.
    """
    path = _check_input(input_path)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size
    num_workers = num_workers or _default_workers(size)
    specials = [s.encode("utf-8") for s in tokenizer.special_tokens]
    bounds = _chunk_bounds(path, _num_chunks(size, num_workers), specials)
    dtype = token_dtype(tokenizer.vocab_size)
    jobs = [(str(path), a, b, dtype) for a, b in zip(bounds, bounds[1:])]
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    num_tokens = 0
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(tmp, "wb"))
            bar = stack.enter_context(tqdm(total=size, unit="B", unit_scale=True,
                                           desc=f"encode {path.name}", disable=not progress))
            if num_workers > 1 and len(jobs) > 1:
                pool = stack.enter_context(
                    _pool(min(num_workers, len(jobs)), _init_encode_worker, (tokenizer,)))
                chunks = pool.imap(_encode_chunk_job, jobs)  # imap keeps the file's order
            else:
                chunks = (_encode_chunk(tokenizer, *job) for job in jobs)
            for (_, start, end, _), ids in zip(jobs, chunks):
                ids.tofile(out)
                num_tokens += len(ids)
                bar.update(end - start)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "num_tokens": num_tokens,
            "tokenizer": tokenizer.fingerprint()}
    write_atomic(f"{out_path}.json", json.dumps(meta))
    return num_tokens


# ----------------------------------------------------------------------------------------------
# Commands: compare, bench (train and encode are thin wrappers in main)


def gpt2_tokenizer(data_dir: Path = DATA_DIR) -> Tokenizer:
    """GPT-2's tokenizer from its own files (vocab 50257, <|endoftext|> = 50256)."""
    return Tokenizer.from_files(data_dir / "gpt2_vocab.json", data_dir / "gpt2_merges.txt",
                                ["<|endoftext|>"])


def tiktoken_gpt2(data_dir: Path = DATA_DIR):
    """tiktoken's GPT-2 encoding built offline from the same files (tiktoken would download)."""
    try:
        import tiktoken
    except ImportError:
        raise ImportError("tiktoken is not installed: pip install tiktoken") from None
    raw = json.loads((data_dir / "gpt2_vocab.json").read_text(encoding="utf-8"))
    ranks = {_from_text(token, "gpt2_vocab.json"): i for token, i in raw.items()
             if token != "<|endoftext|>"}
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": raw["<|endoftext|>"]})


def compare(path: str | os.PathLike, vocab_size: int = 1000, data_dir: Path = DATA_DIR) -> None:
    """Print vocabulary size, token count and compression of each tokenizer on one file.

    The word tokenizer and our BPE are fitted on the file itself, so the word tokenizer looks
    lossless here; on new text every unseen word becomes <unk>.
    """
    path = _check_input(path)
    text = _read_text(path, 0, path.stat().st_size)
    vocab, merges = train_bpe(path, vocab_size, [], progress=False)
    tokenizers = [("characters", CharTokenizer()), ("bytes (UTF-8)", ByteTokenizer()),
                  ("words (+ <unk>)", WordTokenizer(text)),
                  (f"BPE trained here ({vocab_size})", Tokenizer(vocab, merges))]
    if (data_dir / "gpt2_vocab.json").exists():
        tokenizers.append(("BPE GPT-2", gpt2_tokenizer(data_dir)))
    print(f"{path}: {len(text.encode('utf-8')):,} bytes")
    print(f"{'tokenizer':<26} {'vocab size':>10} {'tokens':>10} {'bytes/token':>11}")
    for name, tokenizer in tokenizers:
        num_tokens = len(tokenizer.encode(text))
        print(f"{name:<26} {tokenizer.vocab_size:>10,} {num_tokens:>10,} "
              f"{compression_ratio(text, tokenizer):>11.2f}")


def _best_times(fns: dict[str, Callable], repeat: int) -> dict[str, tuple[float, object]]:
    """name -> (fastest of repeat runs in seconds, a result). The functions take turns, so load
    from other work on the machine falls on all of them alike."""
    best = {name: (math.inf, None) for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            best[name] = (min(best[name][0], time.perf_counter() - start), result)
    return best


def _hf_train(path: Path, vocab_size: int, special_tokens: list[str]):
    """HuggingFace tokenizers' byte-level BPE trainer (benchmark only, never a dependency)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train([str(path)], trainer)
    return tokenizer


def bench(data_dir: Path = DATA_DIR, repeat: int = 3, file_copies: int = 8) -> None:
    """Training and encoding speed, each next to its baseline measured in the same run."""
    shakespeare, corpus_en = data_dir / "tinyshakespeare.txt", data_dir / "corpus.en"
    eos = ["<|endoftext|>"]
    print(f"{os.cpu_count()} CPUs; fastest of {repeat} runs, taking turns")

    runs = {"ours": lambda: train_bpe(shakespeare, 10_000, eos, progress=False)}
    try:
        import tokenizers  # noqa: F401  (only to see whether the baseline is installed)
        runs["HF"] = lambda: _hf_train(shakespeare, 10_000, eos)
    except ImportError:
        pass
    times = _best_times(runs, repeat)
    ours = times["ours"][0]
    line = f"train tinyshakespeare vocab 10,000: ours {ours:.2f} s"
    if "HF" in times:
        line += (f" | HF tokenizers {times['HF'][0]:.2f} s | ours/HF {ours / times['HF'][0]:.1f}x"
                 " (target <= 4x)")
    print(line if "HF" in times else line + " | HF tokenizers not installed")
    small = _best_times({"ours": lambda: train_bpe(corpus_en, 500, eos, progress=False)}, repeat)
    print(f"train corpus.en vocab 500: ours {small['ours'][0]:.3f} s (target < 0.5 s)")

    text = shakespeare.read_text(encoding="utf-8")
    megabytes = len(text.encode("utf-8")) / 1e6
    tokenizer = gpt2_tokenizer(data_dir)

    def encode_cold() -> list[int]:
        tokenizer._cache.clear()  # every pre-token is new to the tokenizer: the harder case
        return tokenizer.encode(text)

    runs = {"cold": encode_cold, "warm": lambda: tokenizer.encode(text)}
    try:
        encoding = tiktoken_gpt2(data_dir)
        runs["tiktoken"] = lambda: encoding.encode(text, allowed_special="all")
    except ImportError as e:
        print(e)
    times = _best_times(runs, repeat)
    speed = {name: megabytes / seconds for name, (seconds, _) in times.items()}
    line = (f"encode tinyshakespeare, GPT-2 vocab: ours {speed['cold']:.2f} MB/s from a cold "
            f"cache, {speed['warm']:.2f} MB/s warm")
    if "tiktoken" in times:
        line += (f" | tiktoken (1 thread) {speed['tiktoken']:.2f} MB/s | ours cold/tiktoken "
                 f"{speed['cold'] / speed['tiktoken']:.2f} (target >= 0.25) | ids identical: "
                 f"{times['cold'][1] == times['tiktoken'][1]}")
    print(line)

    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.txt"
        big.write_text(text * file_copies, encoding="utf-8")
        runs = {workers: partial(encode_file, tokenizer, big, Path(tmp) / f"{workers}.bin",
                                 workers, progress=False) for workers in (1, 2)}
        times = _best_times(runs, repeat)
        size = megabytes * file_copies
        one, two = times[1][0], times[2][0]
        same = np.array_equal(*(np.fromfile(Path(tmp) / f"{w}.bin", np.uint16) for w in (1, 2)))
        print(f"encode_file {size:.1f} MB: 1 process {size / one:.2f} MB/s, 2 processes "
              f"{size / two:.2f} MB/s, speedup {one / two:.2f}x | ids identical: {same}")


# ----------------------------------------------------------------------------------------------
# The command line, shared by every stage: one style, `--key=value` (and `--flag` for True),
# typed from the defaults; config files; one-line errors. Later stages import these from here.

class UsageError(ValueError):
    """Bad command-line input: reported as one `error:` line with exit code 2."""


def typed(key: str, value, default):
    """A command-line string or config-file value as the type of the default: `--lr=1` is a
    float, `--compile=False` a bool, `--max_iters=1e4` an int; literals only, never exec."""
    if isinstance(value, str) and value.lower() in ("true", "false") and (
            default is None or isinstance(default, bool) or default == "auto"):
        return value.lower() == "true"
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if isinstance(default, (list, tuple)):
                value = value.split(",")  # --special_tokens=a,b
            elif default is not None:
                raise UsageError(f"--{key} expects a {type(default).__name__}, got {value!r}")
    if default is None or (default == "auto" and isinstance(value, bool)):
        return value
    if isinstance(default, float) and type(value) is int or type(default) is int and \
            isinstance(value, float) and value.is_integer():
        return type(default)(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if type(value) is not type(default):
        raise UsageError(f"--{key} expects a {type(default).__name__}, got {value!r}")
    return value


def read_config_file(path: str | os.PathLike) -> dict:
    """A JSON object, or `key = value` lines holding Python literals (# comments allowed)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise UsageError(f"{path}: expected a JSON object of settings")
        return values
    values = {}
    for n, line in enumerate(text.splitlines(), 1):
        key, sep, value = line.partition("=")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for candidate in (value, value.split("#", 1)[0]) if sep else ():  # "#" may be in a string
            with contextlib.suppress(ValueError, SyntaxError):
                values[key.strip()] = ast.literal_eval(candidate.strip())
                break
        else:
            raise UsageError(f"{path}:{n}: expected `key = <Python literal>`, got {line!r}")
    return values


def parse_args(argv: Sequence[str], defaults: dict, config_files: bool = False
               ) -> tuple[list[str], dict]:
    """Split argv into positional arguments and {key: value} overrides typed from `defaults`.
    With config_files=True each positional argument is a config file, applied in order with
    the flags (later wins). An unknown key names a valid key only when it is really close."""
    positional, overrides = [], {}
    for arg in argv:
        if not arg.startswith("--"):
            items = read_config_file(arg).items() if config_files else ()
            positional += [] if config_files else [arg]
        else:
            key, sep, value = arg[2:].partition("=")
            items = [(key, value if sep else "True")]
        for key, value in items:
            if key not in defaults:
                close = [k for k in defaults if k.startswith(key) or key.startswith(k)]
                close = close or difflib.get_close_matches(key, list(defaults), 1, cutoff=0.75)
                hint = (f"did you mean --{close[0]}?" if close else
                        "valid keys: " + ", ".join(defaults))
                raise UsageError(f"unknown option --{key}; {hint}")
            overrides[key] = typed(key, value, defaults[key])
    return positional, overrides


def run_cli(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """Run a stage's main(argv): an error prints one line `error: ...` and exits 2 for bad
    usage, 1 otherwise; Ctrl-C exits 130. `--debug` (or CS336_DEBUG=1) shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CS336_DEBUG", "0") != "0"
    try:
        main([a for a in argv if a != "--debug"])
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        message = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.strerror and e.filename:  # "no space left on device: X"
            message = f"{e.strerror[0].lower()}{e.strerror[1:]}: {e.filename}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a BPE tokenizer on a text file")
    train.add_argument("--input", required=True, help="UTF-8 text file")
    train.add_argument("--vocab-size", type=int, required=True, help="256 + merges + specials")
    train.add_argument("--special-token", action="append", default=[],
                       help="a special token, e.g. '<|endoftext|>' (repeat for several)")
    train.add_argument("--out", required=True, help="directory for the tokenizer files")
    train.add_argument("--workers", type=int, default=None, help="processes (default: auto)")
    train.add_argument("--gpt2-format", action="store_true", help="vocab.json as token -> id")
    encode = commands.add_parser("encode", help="encode a text file to a flat token array")
    encode.add_argument("--tokenizer", required=True, help="directory written by train")
    encode.add_argument("--input", required=True, help="UTF-8 text file")
    encode.add_argument("--out", required=True, help="output .bin (uint16 or uint32 ids)")
    encode.add_argument("--workers", type=int, default=None, help="processes (default: auto)")
    compare_cmd = commands.add_parser("compare", help="compression of each tokenizer")
    compare_cmd.add_argument("file", help="UTF-8 text file")
    compare_cmd.add_argument("--vocab-size", type=int, default=1000, help="BPE trained here")
    bench_cmd = commands.add_parser("bench", help="speed next to HF tokenizers and tiktoken")
    bench_cmd.add_argument("--data-dir", type=Path, default=DATA_DIR, help="shared corpora")
    bench_cmd.add_argument("--repeat", type=int, default=3, help="runs per measurement")
    args = parser.parse_args(argv)

    if args.command == "train":
        start = time.perf_counter()
        vocab, merges = train_bpe(args.input, args.vocab_size, args.special_token, args.workers)
        tokenizer = Tokenizer(vocab, merges, args.special_token)
        tokenizer.save_dir(args.out, args.gpt2_format)
        with open(args.input, "rb") as f:  # the first MB is enough to show the compression
            sample = f.read(1 << 20).decode("utf-8", errors="ignore")
        print(f"trained vocab {tokenizer.vocab_size:,} ({len(merges):,} merges) in "
              f"{time.perf_counter() - start:.2f} s -> {args.out}; "
              f"{compression_ratio(sample, tokenizer):.2f} bytes/token on the input")
    elif args.command == "encode":
        tokenizer = Tokenizer.from_dir(args.tokenizer)
        start = time.perf_counter()
        num_tokens = encode_file(tokenizer, args.input, args.out, args.workers)
        seconds = time.perf_counter() - start
        size = Path(args.input).stat().st_size
        print(f"{num_tokens:,} tokens ({size / max(1, num_tokens):.2f} bytes/token) -> "
              f"{args.out} in {seconds:.2f} s ({size / 1e6 / seconds:.2f} MB/s)")
    elif args.command == "compare":
        compare(args.file, args.vocab_size)
    else:
        bench(args.data_dir, args.repeat)


if __name__ == "__main__":
    main()
