"""Stage 1: a byte-level BPE tokenizer that trains fast and encodes exactly like GPT-2.

A language model reads integers, not text. This stage turns text into ids and back, in the order
the CS336 lecture teaches it (`python tokenizer.py` prints a tour of it in a few seconds):
  1. baselines: characters, bytes and words, and how much each compresses (UTF-8 bytes per token);
  2. train_bpe_reference: byte-pair encoding as the lecture describes it; train_bpe, the same fast;
  3. Tokenizer: encode / encode_iterable / decode with a vocabulary, merges and special tokens;
  4. GPT-2's own vocab.json and merges.txt, which give tiktoken's ids exactly;
  5. encode_file: a corpus to a flat token array (.bin) for train.py, in parallel processes.

Commands (CPU only; settings are --key=value; an error is one line, --debug shows the traceback):
  python tokenizer.py                # the tour; also `python tokenizer.py tour`
  python tokenizer.py train --input=../shared/data/tinyshakespeare.txt --vocab_size=10000 \\
      --special_tokens='<|endoftext|>' --out=out/tok_shakespeare   [--workers=N] [--gpt2_format]
  python tokenizer.py encode --tokenizer=out/tok_shakespeare \\
      --input=../shared/data/tinyshakespeare.txt --out=out/shakespeare.bin   [--workers=N]
  python tokenizer.py compare --input=../shared/data/tinyshakespeare.txt   [--vocab_size=1000]
  python tokenizer.py bench          # speed next to HuggingFace tokenizers and tiktoken

Reads UTF-8 (../shared/data: gpt2_vocab.json, gpt2_merges.txt, tinyshakespeare.txt, corpus.en).
Writes, whole or not at all: DIR/{vocab.json,merges.txt,special_tokens.json}; FILE.bin(.json).
Papers: Sennrich et al. 2016 (BPE for subword units); Radford et al. 2019 (GPT-2, byte-level BPE).
"""

import ast
import codecs
import contextlib
import difflib
import hashlib
import heapq
import importlib.util
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
from itertools import chain, product, repeat
from pathlib import Path

import numpy as np
import regex
from tqdm import tqdm

# GPT-2's pre-tokenizer: a contraction, a run of letters, digits or punctuation (each may take one
# leading space), or a run of whitespace that leaves its last space to the next word. BPE never
# merges across two pre-tokens, so " the" and "the" stay different tokens, not " t"+"he".
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN_RE = regex.compile(GPT2_PAT)
DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data"  # the shared corpora
CHUNK_BYTES = 4 << 20  # a process reads a file this much at a time: bounds memory per process
STREAM_CHARS = 1 << 20  # encode_iterable encodes its buffer each time it holds this many chars
CACHE_ENTRIES = 100_000  # pre-token -> ids cache per tokenizer; cleared when full (bounded memory)
LONG_PRETOKEN = 64  # characters; longer pre-tokens take _bpe_reference's linear-per-merge path
_NO_MERGE = 1 << 62  # the rank of a pair that has no merge: after every real rank
Vocab, Merges = dict[int, bytes], list[tuple[bytes, bytes]]  # id -> token; (a, b) in merge order


# 1. Baselines: characters, bytes, words -----------------------------------------------------------
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
    """One id per word (GPT-2 pre-token) seen in training, any other <unk> (id 0): short sequences,
    but the vocabulary grows with the corpus and unseen words are lost (BPE falls back to bytes)."""
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


# 2. Training byte-level BPE: the algorithm as described, then the same merges fast ----------------
def count_pretokens(text: str, special_tokens: Sequence[str], pretokenize: bool = True) -> Counter:
    """Pre-token counts; special tokens cut the text and are dropped, so no merge touches them."""
    pieces = _special_re(special_tokens).split(text)  # pretokenize=False keeps each piece whole
    return Counter(chain.from_iterable(map(PRETOKEN_RE.findall, pieces)) if pretokenize else pieces)


def merge(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of pair in ids, left to right, by new_id."""
    first, second = pair
    out, i, last = [], 0, len(ids) - 1
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


def train_bpe_reference(input_path: str | os.PathLike, vocab_size: int, special_tokens: list[str],
                        pretokenize: bool = True, verbose: bool = False) -> tuple[Vocab, Merges]:
    """Byte-level BPE as the lecture describes it: (vocab id -> bytes, merges in creation order).
    Pre-tokens start as UTF-8 bytes (ids 0-255); until the vocabulary is full, the most frequent
    pair of neighbours (ties: the greater bytes) becomes a new token, merged everywhere."""
    path, special_tokens, num_merges = _check_training(input_path, vocab_size, special_tokens)
    counts = count_pretokens(path.read_text(encoding="utf-8"), special_tokens, pretokenize)
    words = {tuple(pretoken.encode("utf-8")): count for pretoken, count in counts.items()}
    vocab, merges = {i: bytes([i]) for i in range(256)}, []
    for _ in range(num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break  # every pre-token is a single token: nothing left to merge
        a, b = max(pairs, key=lambda pair: (pairs[pair], vocab[pair[0]], vocab[pair[1]]))
        new_id = len(vocab)
        vocab[new_id] = vocab[a] + vocab[b]
        merges.append((vocab[a], vocab[b]))
        if verbose:
            print(f"  merge {len(merges)}: {_show(vocab[a])} + {_show(vocab[b])} -> "
                  f"{_show(vocab[new_id])}  (count {pairs[a, b]})")
        # distinct words stay distinct: splitting new_id again undoes the merge
        words = {tuple(merge(word, (a, b), new_id)): count for word, count in words.items()}
    return vocab | {len(vocab) + k: s.encode("utf-8") for k, s in enumerate(special_tokens)}, merges


def train_bpe(input_path: str | os.PathLike, vocab_size: int, special_tokens: list[str],
              num_workers: int | None = None, progress: bool = True) -> tuple[Vocab, Merges]:
    """train_bpe_reference's result, fast: processes count the file chunks' pre-tokens in parallel;
    a merge recounts only the words with its pair (pair_words may list a few that lost it), and a
    heap finds the top pair: a stale entry is refiled at the top, an increase pushes anew."""
    path, special_tokens, num_merges = _check_training(input_path, vocab_size, special_tokens)
    counts = Counter()
    for chunk_counts in _map_chunks(count_pretokens, (special_tokens,), path, special_tokens,
                                    num_workers, "pre-tokenize", progress):
        counts.update(chunk_counts)
    words, freqs = [list(p.encode("utf-8")) for p in counts], list(counts.values())
    vocab, merges = {i: bytes([i]) for i in range(256)}, []
    pair_counts, pair_words = defaultdict(int), defaultdict(set)  # pair -> count; -> words with it
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(w)
    # Ties go to the greater pair of bytes: the min-heap keys a token by its negated bytes, then a
    # 1 (above any negated byte, so a prefix such as b"a" < b"ab" sorts after the longer token).
    reverse = [tuple(-b for b in vocab[i]) + (1,) for i in range(len(vocab))]
    heap = [(-count, reverse[a], reverse[b], a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)
    for _ in tqdm(range(num_merges), desc="merges", disable=not progress):
        while heap:
            neg_count, _, _, a, b = heap[0]
            count = pair_counts[a, b]
            if count == -neg_count:
                break
            if count:  # a stale entry: refile it with the true count
                heapq.heapreplace(heap, (-count, reverse[a], reverse[b], a, b))
            else:  # the pair no longer occurs anywhere
                heapq.heappop(heap)
        else:
            break  # every word is a single token: nothing left to merge
        heapq.heappop(heap)
        new_id = len(vocab)
        vocab[new_id] = vocab[a] + vocab[b]
        reverse.append(reverse[a][:-1] + reverse[b])  # the key of vocab[a] + vocab[b]
        merges.append((vocab[a], vocab[b]))
        new_pairs = set()  # only pairs holding new_id can grow: the others lost neighbours
        for w in pair_words.pop((a, b)):
            word = words[w]
            new_word = merge(word, (a, b), new_id)
            if len(new_word) == len(word):
                continue  # an earlier merge took the pair from this word
            words[w], freq = new_word, freqs[w]
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= freq
            for pair in zip(new_word, new_word[1:]):
                pair_counts[pair] += freq
                if new_id in pair:
                    pair_words[pair].add(w)
                    new_pairs.add(pair)
        for pair in new_pairs:
            heapq.heappush(heap, (-pair_counts[pair], reverse[pair[0]], reverse[pair[1]], *pair))
    return vocab | {len(vocab) + k: s.encode("utf-8") for k, s in enumerate(special_tokens)}, merges


# 3. The tokenizer: encode, encode_iterable, decode ------------------------------------------------
class _PretokenCache(dict):
    """pre-token -> ids, a missing one encoded once by self.bpe; cleared when full (bounded)."""
    def __missing__(self, pretoken: str) -> list[int]:
        if len(self) >= CACHE_ENTRIES:
            self.clear()
        return self.setdefault(pretoken, self.bpe(pretoken))


class Tokenizer:
    """Byte-level BPE: a vocabulary (id -> bytes), its merges, special tokens kept whole (the
    first in the text wins, then the longest; any missing from vocab get the next ids)."""
    def __init__(self, vocab: Vocab, merges: Merges, special_tokens: Iterable[str] | None = None):
        self.vocab = {int(i): bytes(token) for i, token in vocab.items()}
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]
        self.special_tokens = _check_specials(special_tokens)
        for s in map(str.encode, self.special_tokens):
            if s not in self.vocab.values():
                self.vocab[len(self.vocab)] = s
        # token -> id; a token that occurs twice keeps its lowest id (written last)
        self._ids = {token: i for i, token in sorted(self.vocab.items(), reverse=True)}
        self.vocab_size = len(self.vocab)
        if sorted(self.vocab) != list(range(self.vocab_size)):
            raise ValueError(f"vocabulary ids must be 0..{self.vocab_size - 1} without gaps")
        if any(bytes([b]) not in self._ids for b in range(256)):
            raise ValueError("the vocabulary lacks some of the 256 single bytes")
        self._byte_ids = [self._ids[bytes([b])] for b in range(256)]
        self._ranks, self._merged_id = {}, []  # pair of ids -> rank (merge order); rank -> id
        for rank, (a, b) in enumerate(self.merges):
            if not {a, b, a + b} <= self._ids.keys():
                raise ValueError(f"merge {rank} ({a!r}, {b!r}) uses a token not in the vocabulary")
            self._ranks.setdefault((self._ids[a], self._ids[b]), rank)
            self._merged_id.append(self._ids[a + b])
        self._special_ids = {s: self._ids[s.encode("utf-8")] for s in self.special_tokens}
        self._special_re = _special_re(self.special_tokens)
        self._cache = _PretokenCache()
        self._cache.bpe = self._bpe

    def token_id(self, special_token: str) -> int:
        """The id of a special token, e.g. tokenizer.token_id("<|endoftext|>")."""
        if special_token not in self._special_ids:
            raise ValueError(f"{special_token!r} is not a special token of this tokenizer; "
                             f"its special tokens are {self.special_tokens}")
        return self._special_ids[special_token]

    def fingerprint(self) -> str:
        """A short hash of vocabulary, merges and special tokens: ties a .bin to its tokenizer."""
        text = "".join(f"{self.vocab[i].hex()}\n" for i in range(len(self.vocab)))
        text += "".join(f"{a.hex()} {b.hex()}\n" for a, b in self.merges)
        return hashlib.sha256((text + json.dumps(self.special_tokens)).encode()).hexdigest()[:16]

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
        """_bpe_reference, twice as fast on words: re-ranks only the merged pair's neighbours
        (quadratic: long pre-tokens take the reference). Same ids while no merge creates a pair
        ranked before it: true of trained merges and of GPT-2's."""
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
        # the cache's __getitem__ and the chaining run in C; only a miss calls back into Python
        return list(chain.from_iterable(map(self._cache.__getitem__, PRETOKEN_RE.findall(text))))

    def encode(self, text: str) -> list[int]:
        ids, start = [], 0
        for match in self._special_re.finditer(text):
            ids += self._encode_ordinary(text[start : match.start()])
            ids.append(self._special_ids[match.group()])
            start = match.end()
        return ids + self._encode_ordinary(text[start:])

    def encode_iterable(self, iterable: Iterable[str],
                        buffer_chars: int = STREAM_CHARS) -> Iterator[int]:
        """Encode a stream of strings (e.g. an open file's lines) lazily, in bounded memory.
        The buffer is encoded up to its last safe cut, so the ids equal encode("".join(...))."""
        pending, size, limit = [], 0, buffer_chars
        for piece in iterable:
            pending.append(piece)
            size += len(piece)
            if size >= limit:
                text = "".join(pending)
                cut = _find_cut(text, self.special_tokens, last=True)
                yield from self.encode(text[:cut])
                pending, size = [text[cut:]], len(text) - cut
                limit = max(buffer_chars, 2 * size)  # no cut in text: double it, no O(n^2)
        yield from self.encode("".join(pending))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to text; bytes that are not valid UTF-8 and unknown ids become U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # numpy arrays, torch tensors
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"decode takes token ids, got {type(ids).__name__}")
        data = b"".join(self.vocab.get(operator.index(i), b"\xef\xbf\xbd") for i in ids)  # U+FFFD
        return data.decode("utf-8", errors="replace")

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
                   special_tokens: Iterable[str] | None = None) -> "Tokenizer":
        """Load a vocab.json and merges.txt in GPT-2's format or ours (told apart by vocab.json)."""
        special_tokens, raw = _check_specials(special_tokens), _read_file(vocab_path)
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"{vocab_path}: expected a non-empty JSON object")
        if all(type(v) is int for v in raw.values()):  # GPT-2's: token -> id
            # HF writes added (special) tokens as they are, not byte-encoded
            vocab = {i: token.encode("utf-8") if token in special_tokens
                     else _from_text(token, str(vocab_path)) for token, i in raw.items()}
            if len(vocab) != len(raw):
                raise ValueError(f"{vocab_path}: two tokens have the same id")
        elif all(type(v) is str for v in raw.values()) and all(k.isdigit() for k in raw):  # ours
            vocab = {int(i): _from_text(token, f"{vocab_path}, id {i}") for i, token in raw.items()}
        else:
            raise ValueError(f"{vocab_path}: expected token -> id (GPT-2's vocab.json) or id -> "
                             "token (ours)")
        merges = []
        for number, line in enumerate(_read_file(merges_path, parse=None).split("\n"), 1):
            if not line or (number == 1 and line.startswith("#version")):
                continue
            parts, at = line.split(" "), f"{merges_path}, line {number}"
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{at}: expected two tokens separated by one space, got {line!r}")
            merges.append(tuple(_from_text(part, at) for part in parts))
        return cls(vocab, merges, special_tokens)

    def save(self, vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
             gpt2_format: bool = False) -> None:
        """Write vocab.json and merges.txt atomically. Ours maps id -> token; GPT-2's maps
        token -> id, which cannot hold two ids with the same bytes (training can make such)."""
        items = sorted(self.vocab.items())  # text: each token as GPT-2's files write it (section 4)
        text = {token: token.decode("latin-1").translate(_BYTE_TO_CHAR) for _, token in items}
        vocab_json = ({text[token]: i for i, token in items} if gpt2_format
                      else {str(i): text[token] for i, token in items})
        if len(vocab_json) != len(self.vocab):
            raise ValueError("two ids have the same bytes; GPT-2's vocab.json cannot hold that, "
                             "save with gpt2_format=False")
        merges_txt = "".join(f"{text[a]} {text[b]}\n" for a, b in self.merges)
        # both files are renamed only after both are written: Ctrl-C leaves the old pair
        with atomic_output(vocab_path) as vocab_tmp, atomic_output(merges_path) as merges_tmp:
            vocab_tmp.write_text(json.dumps(vocab_json, ensure_ascii=False, indent=0), "utf-8")
            merges_tmp.write_text("#version: 0.2\n" + merges_txt, "utf-8")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load what save_dir (and `python tokenizer.py train --out=DIR`) wrote."""
        if not (path := Path(path)).is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        specials = path / "special_tokens.json"
        special_tokens = _read_file(specials) if specials.exists() else []
        if not isinstance(special_tokens, list):
            raise ValueError(f"{specials}: expected a JSON list of strings")
        return cls.from_files(path / "vocab.json", path / "merges.txt", special_tokens)

    def save_dir(self, path: str | os.PathLike, gpt2_format: bool = False) -> None:
        """Write DIR/vocab.json, DIR/merges.txt and DIR/special_tokens.json."""
        (path := Path(path)).mkdir(parents=True, exist_ok=True)
        with atomic_output(path / "special_tokens.json") as tmp:
            tmp.write_text(json.dumps(self.special_tokens), "utf-8")
            self.save(path / "vocab.json", path / "merges.txt", gpt2_format)


# 4. Files: GPT-2's format, and ours ---------------------------------------------------------------
# GPT-2 writes each token as text, one printable character per byte: printable Latin-1 bytes stand
# for themselves, the others (controls, space) shift to U+0100 on: a space shows up as "Ġ".
_PRINTABLE = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # ! to ~, ¡ to ¬, ® to ÿ
_SHIFTED = [b for b in range(256) if b not in _PRINTABLE]
_BYTE_TO_CHAR = {b: chr(b) for b in _PRINTABLE} | {b: chr(256 + i) for i, b in enumerate(_SHIFTED)}
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _from_text(text: str, where: str) -> bytes:
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in text)
    except KeyError as e:
        raise ValueError(f"{where}: {text!r} has {e.args[0]!r}, which is not in GPT-2's "
                         "byte-to-unicode table") from None


def _read_file(path: str | Path, error: type = ValueError, parse: Callable | None = json.loads):
    try:
        text = Path(path).read_text(encoding="utf-8")
        return parse(text) if parse else text
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid {'JSON' if parse else 'UTF-8'} ({e})") from None


def gpt2_tokenizer(data_dir: Path = DATA_DIR) -> Tokenizer:
    """GPT-2's tokenizer from its own files (vocab 50257, <|endoftext|> = 50256)."""
    return Tokenizer.from_files(data_dir / "gpt2_vocab.json", data_dir / "gpt2_merges.txt",
                                ["<|endoftext|>"])


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on any
    error (Ctrl-C too) it is deleted. A temp file that kill -9 left is overwritten next time."""
    tmp = Path(f"{path}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a whole file so that a crash leaves the old file or the new one, never half."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


# 5. Encoding a corpus into a token array, and the plumbing that cuts files for processes ----------
def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype for ids below vocab_size: half the disk and reads of int32."""
    if vocab_size > 1 << 32:
        raise ValueError(f"vocab_size={vocab_size} does not fit in uint32")
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _encode_text(text: str, tokenizer: Tokenizer, dtype: np.dtype) -> np.ndarray:
    return np.array(tokenizer.encode(text), dtype=dtype)


def encode_file(tokenizer: Tokenizer, input_path: str | os.PathLike, out_path: str | os.PathLike,
                num_workers: int | None = None, progress: bool = True) -> int:
    """Encode a UTF-8 file to a token_dtype array at out_path (chunks in processes, written in
    order); returns the token count. out_path and its sidecar .json appear only when whole."""
    path, dtype = _check_input(input_path, Path(out_path).parent), token_dtype(tokenizer.vocab_size)
    with atomic_output(out_path) as tmp, open(tmp, "wb") as out:
        for ids in _map_chunks(_encode_text, (tokenizer, dtype), path, tokenizer.special_tokens,
                               num_workers, f"encode {path.name}", progress):
            ids.tofile(out)
        num_tokens = out.tell() // dtype.itemsize
    meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "num_tokens": num_tokens}
    write_atomic(f"{out_path}.json", json.dumps(meta | {"tokenizer": tokenizer.fingerprint()}))
    return num_tokens


# Processes handle a file in chunks, encode_iterable a stream in pieces: a cut before text[c]
# changes nothing when (1) text[c-1] is not whitespace and text[c] is: no GPT-2 pre-token holds
# that pair, and each pattern that looked at text[c] (end of a letter, digit or punctuation run,
# letter after an apostrophe, `(?!\S)`) decides the same at the end of text; (2) no special token
# is within its length of c. The course cuts only at "<|endoftext|>"; this rule works without.
def _find_cut(text: str, special_tokens: Sequence[str], last: bool = False) -> int:
    """The first (or last) safe cut in text, away from its ends by a special token's length."""
    longest, special_re = max(map(len, special_tokens), default=0), _special_re(special_tokens)
    candidates = regex.compile(r"(?r)\S\s" if last else r"\S\s")  # (?r): search backwards
    for match in candidates.finditer(text, max(0, longest - 1), max(0, len(text) - longest + 1)):
        cut = match.start() + 1
        if not special_re.search(text, cut - longest, cut + longest):
            return cut
    return 0


def _chunk_bounds(path: Path, num_chunks: int, special_tokens: Sequence[str]) -> list[int]:
    """Byte offsets [0, ..., size] cutting the file into about num_chunks safe chunks."""
    size, bounds, window = path.stat().st_size, [0], 1 << 16
    with open(path, "rb") as f:
        for i in range(1, num_chunks):
            pos = max(size * i // num_chunks, bounds[-1] + 1)
            while pos < size:  # look for a cut in the next window of the file
                f.seek(pos)
                data = f.read(window)
                skip = next((k for k, byte in enumerate(data[:4]) if not 0x80 <= byte < 0xC0), 0)
                text = data[skip:].decode("utf-8", errors="ignore")  # drops a cut-off character
                if cut := _find_cut(text, special_tokens):
                    bounds.append(pos + skip + len(text[:cut].encode("utf-8")))
                    break
                pos += window // 2  # windows overlap: a cut needs context on both sides
            if pos >= size:  # no safe cut left: later scans would only re-read the same tail
                break
    return bounds + [size]


def _chunk_job(job: tuple[Callable, str, int, int], args: tuple | None = None):
    """fn(the chunk's text, *args); in a pool, args came once (the initializer set .args)."""
    fn, path, start, end = job
    with open(path, "rb") as f:
        f.seek(start)  # the text is UTF-8: _check_input made sure
        return fn(f.read(end - start).decode("utf-8"), *(_chunk_job.args if args is None else args))


def _map_chunks(fn: Callable, args: tuple, path: Path, special_tokens: Sequence[str],
                num_workers: int | None, desc: str, progress: bool) -> Iterator:
    """fn(text, *args) on each chunk, in order, in num_workers processes (default: as needed)."""
    size = path.stat().st_size
    num_workers = num_workers or max(1, min(os.cpu_count() or 1, math.ceil(size / CHUNK_BYTES)))
    num_chunks = num_workers * math.ceil(size / (num_workers * CHUNK_BYTES))  # chunks <= ~4 MB
    bounds = _chunk_bounds(path, num_chunks, special_tokens)
    jobs = [(fn, str(path), a, b) for a, b in zip(bounds, bounds[1:])]
    # On Linux, fork starts a worker in milliseconds, tokenizer included (spawn unpickles it: ~1 s);
    # its hazard, a lock held by another thread, cannot bite: workers run only regex and numpy.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    parallel = num_workers > 1 and len(jobs) > 1
    with (tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar,
          context.Pool(min(num_workers, len(jobs)), partial(setattr, _chunk_job, "args"),
                       (args,)) if parallel else contextlib.nullcontext() as pool):
        results = pool.imap(_chunk_job, jobs) if parallel else (_chunk_job(j, args) for j in jobs)
        for (_, _, start, end), result in zip(jobs, results):
            bar.update(end - start)
            yield result


def _check_input(path: str | os.PathLike, out_dir: Path | None = None) -> Path:
    """Before any work: the input exists, is not empty, is UTF-8; out_dir takes a probe file."""
    if not (path := Path(path)).is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if (size := path.stat().st_size) == 0:
        raise ValueError(f"input file is empty: {path}")
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        for start in range(0, size, CHUNK_BYTES):
            held = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                decoder.decode(f.read(CHUNK_BYTES), final=start + CHUNK_BYTES >= size)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not valid UTF-8 at byte offset "
                                 f"{start - held + e.start} ({e.reason})") from None
    try:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise OSError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    return path


def _check_training(input_path: str | os.PathLike, vocab_size: int, special_tokens: list[str],
                    out_dir: Path | None = None) -> tuple[Path, list[str], int]:
    """A trainer's arguments, cheap checks first: (input file, special tokens, merges to learn)."""
    special_tokens = _check_specials(special_tokens)
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the 256 bytes plus "
                         f"{len(special_tokens)} special tokens")
    return _check_input(input_path, out_dir), special_tokens, vocab_size - 256 - len(special_tokens)


def _special_re(special_tokens: Sequence[str]) -> regex.Pattern:
    """Any special token, longest first (it wins an overlap); with none, \\A(?!): fails at once."""
    by_length = sorted(special_tokens, key=len, reverse=True)
    return regex.compile("|".join(map(regex.escape, by_length)) or r"\A(?!)")


def _check_specials(special_tokens: Iterable[str] | None) -> list[str]:
    if isinstance(special_tokens, (str, bytes)):  # list("<|endoftext|>") would be its characters
        raise TypeError(f"special_tokens must be a list of strings, e.g. [{special_tokens!r}]")
    specials = list(dict.fromkeys(special_tokens or []))  # drop repeats, keep the order
    if bad := [s for s in specials if not isinstance(s, str) or not s]:
        raise ValueError(f"special tokens must be non-empty strings, got {bad[0]!r}")
    return specials


# 6. Commands: the tour, compare, bench (train and encode are thin wrappers in main) ---------------
def _show(token: bytes) -> str:
    return repr(token.decode("utf-8", errors="backslashreplace"))


def tour(data_dir: Path = DATA_DIR) -> None:
    """The lecture in examples: `python tokenizer.py` with no arguments prints this."""
    text = "Hello 👋 世界!"  # ASCII, an emoji (4 UTF-8 bytes) and CJK (3 bytes a character)
    toy, num_merges = "the cat in the hat. the cat sat on the mat.", 10
    print(f"1. One string, four tokenizers: {text!r}, {len(text.encode())} UTF-8 bytes")
    gpt2 = gpt2_tokenizer(data_dir)
    words = WordTokenizer((data_dir / "tinyshakespeare.txt").read_text("utf-8"))
    for name, tokenizer in [("characters", CharTokenizer()), ("bytes", ByteTokenizer()),
                            ("words of tinyshakespeare", words), ("BPE GPT-2", gpt2)]:
        print(f"  {name:<24} vocab {tokenizer.vocab_size:>9,}  "
              f"{compression_ratio(text, tokenizer):.2f} bytes/token  ids {tokenizer.encode(text)}")
    print(f"  words decode back to {words.decode(words.encode(text))!r}: unseen words are lost")
    pieces = [gpt2.vocab[i] for i in gpt2.encode(text)]
    print(f"  GPT-2's tokens are bytes, not characters: {pieces}")
    assert gpt2.decode(gpt2.encode(text)) == text  # BPE falls back to bytes: nothing is lost
    print(f"\n2. BPE learns merges from counts, here on {toy!r}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "toy.txt"
        path.write_text(toy, encoding="utf-8")
        vocab, merges = train_bpe_reference(path, 256 + num_merges, [], verbose=True)
        assert (vocab, merges) == train_bpe(path, 256 + num_merges, [], progress=False)
        ids = Tokenizer(vocab, merges).encode(toy)
        print(f"  the text becomes {len(ids)} tokens: {' '.join(_show(vocab[i]) for i in ids)}")
        _, raw = train_bpe_reference(path, 256 + num_merges, [], pretokenize=False)
    print(f"\n3. What GPT-2's pre-tokenization prevents: the same {num_merges} merges without it "
          "span words and punctuation")
    print(f"  without: {' '.join(_show(a + b) for a, b in raw)}")
    print(f"  with:    {' '.join(_show(a + b) for a, b in merges)}")
    print(f"  because BPE then merges only inside the pre-tokens {PRETOKEN_RE.findall(toy)}")
    assert not any(b" " in (a + b)[1:] for a, b in merges)  # a space can only start a token
    print("\n4. Compression on a real file (BPE trained here with vocab 1000):")
    compare(data_dir / "tinyshakespeare.txt", 1000, data_dir)


def compare(path: str | os.PathLike, vocab_size: int = 1000, data_dir: Path = DATA_DIR) -> None:
    """Vocabulary size, token count and compression of each tokenizer on one file. Words and our
    BPE are fitted on the file itself, so words look lossless here; not so on new text."""
    text = _check_input(path).read_text(encoding="utf-8")
    vocab, merges = train_bpe(path, vocab_size, [], progress=False)
    tokenizers = [("characters", CharTokenizer()), ("bytes (UTF-8)", ByteTokenizer()),
                  ("words (+ <unk>)", WordTokenizer(text)),
                  (f"BPE trained here ({vocab_size})", Tokenizer(vocab, merges)),
                  ("BPE GPT-2", gpt2_tokenizer(data_dir))]
    print(f"{path}: {len(text.encode('utf-8')):,} bytes")
    print(f"{'tokenizer':<26} {'vocab size':>10} {'tokens':>10} {'bytes/token':>11}")
    for name, tokenizer in tokenizers:
        print(f"{name:<26} {tokenizer.vocab_size:>10,} {len(tokenizer.encode(text)):>10,} "
              f"{compression_ratio(text, tokenizer):>11.2f}")


def _hf_train(path: Path, vocab_size: int, special_tokens: list[str]) -> None:
    """HuggingFace tokenizers' byte-level BPE trainer (benchmark only, never a dependency)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train([str(path)], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))


def bench(data_dir: str | Path = DATA_DIR, repeat: int = 3, file_copies: int = 8) -> None:
    """Training and encoding speed, each next to its baseline measured in the same run. The runs
    take turns, the fastest of `repeat` kept, so load from other work falls on all of them alike."""
    shakespeare, eos = (data_dir := Path(data_dir)) / "tinyshakespeare.txt", ["<|endoftext|>"]
    text, tokenizer = shakespeare.read_text(encoding="utf-8"), gpt2_tokenizer(data_dir)
    megabytes, tmp = len(text.encode("utf-8")) / 1e6, tempfile.TemporaryDirectory()
    (big := Path(tmp.name) / "big.txt").write_text(text * file_copies, encoding="utf-8")
    runs = {"ours": lambda: train_bpe(shakespeare, 10_000, eos, progress=False),
            "corpus.en": lambda: train_bpe(data_dir / "corpus.en", 500, eos, progress=False),
            "cold": lambda: tokenizer._cache.clear() or tokenizer.encode(text),  # nothing cached
            "warm": lambda: tokenizer.encode(text)}
    runs |= {n: lambda n=n: encode_file(tokenizer, big, f"{big}.{n}", n, progress=False)
             for n in (1, 2)}  # processes
    if importlib.util.find_spec("tokenizers"):
        runs["HF"] = lambda: _hf_train(shakespeare, 10_000, eos)
    if importlib.util.find_spec("tiktoken"):  # built offline from GPT-2's files, as ours is
        import tiktoken
        ranks = {token: i for i, token in tokenizer.vocab.items() if i != 50256}
        encoding = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": 50256})
        runs["tiktoken"] = lambda: encoding.encode(text, allowed_special="all")
    print(f"{os.cpu_count()} CPUs; fastest of {repeat} runs, taking turns")
    t, ids = dict.fromkeys(runs, math.inf), {}
    with tmp:
        for _, (name, run) in product(range(repeat), runs.items()):
            start = time.perf_counter()
            ids[name] = run()
            t[name] = min(t[name], time.perf_counter() - start)
        same = np.array_equal(*(np.fromfile(f"{big}.{n}", np.uint16) for n in (1, 2)))
    print(f"train tinyshakespeare vocab 10,000: ours {t['ours']:.2f} s | " + (
        f"HF tokenizers {t['HF']:.2f} s | ours/HF {t['ours'] / t['HF']:.1f}x (target <= 4x)"
        if "HF" in t else "HF tokenizers not installed (pip install tokenizers)"))
    print(f"train corpus.en vocab 500: ours {t['corpus.en']:.3f} s (target < 0.5 s)")
    speed, size = {name: megabytes / s for name, s in t.items()}, megabytes * file_copies
    print(f"encode tinyshakespeare, GPT-2 vocab: ours {speed['cold']:.2f} MB/s from a cold "
          f"cache, {speed['warm']:.2f} MB/s warm | " + (
              f"tiktoken (1 thread) {speed['tiktoken']:.2f} MB/s | ours cold/tiktoken "
              f"{speed['cold'] / speed['tiktoken']:.2f} (target >= 0.25) | ids identical: "
              f"{ids['cold'] == ids['tiktoken']}" if "tiktoken" in t else
              "tiktoken not installed (pip install tiktoken)"))
    print(f"encode_file {size:.1f} MB: 1 process {size / t[1]:.2f} MB/s, 2 processes "
          f"{size / t[2]:.2f} MB/s, speedup {t[1] / t[2]:.2f}x | ids identical: {same}")


# 7. The command line, shared by every stage (they import it from here) ----------------------------
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
        except (ValueError, SyntaxError):  # a word: a,b for a list, else rejected below
            value = value.split(",") if isinstance(default, (list, tuple)) else value
    if default is None or (default == "auto" and isinstance(value, bool)):
        return value
    if isinstance(default, (list, tuple)) and type(value) in (int, float, list, tuple):
        return type(default)(value if type(value) in (list, tuple) else [value])  # 1 is [1]
    if (isinstance(default, float) and type(value) is int or type(default) is int and
            isinstance(value, float) and value.is_integer()):
        return type(default)(value)
    if type(value) is not type(default):
        kind = {int: "an integer", float: "a number", bool: "True or False", str: "a string",
                list: "a list", tuple: "a tuple", dict: "a dict"}.get(type(default))
        raise UsageError(f"--{key} expects {kind or type(default).__name__}, got {value!r}")
    return value


def read_config_file(path: str | os.PathLike) -> dict:
    """A JSON object, or `key = value` lines holding Python literals (# comments allowed)."""
    if not (p := Path(path)).is_file():
        raise UsageError(f"config file {path} does not exist")
    if p.suffix == ".json":
        if not isinstance(values := _read_file(path, UsageError), dict):
            raise UsageError(f"{path}: expected a JSON object of settings")
        return values
    values = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
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
    """argv -> (positional arguments, {key: value} typed from `defaults`); with config_files each
    positional is a config file, applied in order with the flags. Suggests only close keys."""
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


def parse_command(argv: Sequence[str], commands: dict[str, dict], default: str,
                  positional: Sequence[str] = ()) -> tuple[str, dict, dict, list[str]]:
    """`[COMMAND] [--key=value ...]` -> (command, its settings, the settings given, positional
    arguments); no command runs `default`; only `positional`'s commands take arguments."""
    argv = list(argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else default
    if command not in commands:
        raise UsageError(f"unknown command {command!r}; the commands are {', '.join(commands)}")
    args, overrides = parse_args(argv, commands[command])
    if args and command not in positional:
        raise UsageError(f"unexpected argument {args[0]!r}; settings are --key=value")
    return command, {**commands[command], **overrides}, overrides, args


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
    except BrokenPipeError:  # `python model.py | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except Exception as e:
        if debug:
            raise
        message = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.strerror and e.filename:  # "no space left on device: X"
            message = f"{e.strerror[0].lower()}{e.strerror[1:]}: {e.filename}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)


# Each command's settings and their defaults; "" marks a setting it needs; workers=0: one per core.
COMMANDS = {"tour": {}, "train": {"input": "", "vocab_size": 10_000, "special_tokens": [],
                                  "out": "", "workers": 0, "gpt2_format": False},
            "encode": {"tokenizer": "", "input": "", "out": "", "workers": 0},
            "compare": {"input": str(DATA_DIR / "tinyshakespeare.txt"), "vocab_size": 1000},
            "bench": {"data_dir": str(DATA_DIR), "repeat": 3}}


def main(argv: list[str]) -> None:
    """`python tokenizer.py [COMMAND] [--key=value ...]`; no command runs the tour."""
    if "-h" in argv or "--help" in argv:
        return print(__doc__)
    command, cfg, _, files = parse_command(argv, COMMANDS, "tour", positional=["compare"])
    if len(files) > 1:
        raise UsageError(f"unexpected argument {files[1]!r}; settings are --key=value")
    if files:
        cfg["input"] = files[0]  # `compare FILE` reads naturally
    if missing := [key for key, value in cfg.items() if value == ""]:
        raise UsageError(f"{command} needs --{missing[0]}=...; see python tokenizer.py --help")
    if command in ("tour", "compare", "bench"):  # their settings are their arguments, in order
        return {"tour": tour, "compare": compare, "bench": bench}[command](*cfg.values())
    if command == "train":
        specials, out = [s for s in cfg["special_tokens"] if s], Path(cfg["out"])  # "" means none
        _check_training(cfg["input"], cfg["vocab_size"], specials, out)  # checks before the work
        start = time.perf_counter()
        vocab, merges = train_bpe(cfg["input"], cfg["vocab_size"], specials, cfg["workers"] or None)
        Tokenizer(vocab, merges, specials).save_dir(out, cfg["gpt2_format"])
        print(f"trained vocab {len(vocab):,} ({len(merges):,} merges) in "
              f"{time.perf_counter() - start:.2f} s -> {out}")
    elif command == "encode":
        tokenizer, start = Tokenizer.from_dir(cfg["tokenizer"]), time.perf_counter()
        num_tokens = encode_file(tokenizer, cfg["input"], cfg["out"], cfg["workers"] or None)
        seconds, size = time.perf_counter() - start, Path(cfg["input"]).stat().st_size
        print(f"{num_tokens:,} tokens ({size / max(1, num_tokens):.2f} bytes/token) -> "
              f"{cfg['out']} in {seconds:.2f} s ({size / 1e6 / seconds:.2f} MB/s)")


if __name__ == "__main__":
    run_cli(main)
