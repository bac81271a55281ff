"""The one test file: every stage in stage order, on CPU, offline, seeded.

Run: python -m pytest -q test_all.py (the README's test command; .ci/run calls it).
Reads the shared corpora in ../shared/data; writes only to pytest's temporary folders.
"""

import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
import torch.nn.functional as F
from torch import nn

import kernels
import model as M
import train
from model import ModelConfig, TransformerLM
from tokenizer import (ByteTokenizer, CharTokenizer, Tokenizer, WordTokenizer, _chunk_bounds,
                       compression_ratio, encode_file, gpt2_tokenizer, main, token_dtype,
                       train_bpe)
from train import (SOAP, AdamW, Muon, _newtonschulz_polynomial, _power_iteration,
                   _rotate_second_moment, adamw_update_foreach, adamw_update_reference,
                   decay_param_groups, newtonschulz_gram, param_groups_for_muon,
                   zeropower_via_newtonschulz)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every tensor here is tiny: one thread beats two (OpenMP's barriers cost more than the work),
    and two threads spin-wait badly when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# =================================================================================================
# tokenizer.py
# =================================================================================================

from tokenizer import (LONG_PRETOKEN, UsageError, run_cli, tour, typed,  # noqa: E402
                       train_bpe_reference)

_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


_EOT = "<|endoftext|>"


_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


_HARD_TEXTS = [
    "Hello, world! This is a test.",
    "emoji 👋🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ✨sparkles✨",
    "日本語のテキスト、中文文本。한국어 텍스트 ไทย العربية हिन्दी",
    "a   b\t\t\n\n\n  c   \n \n\t x",
    "line one\r\nline two\r\n\r\nline four\r\n",
    "trailing spaces   ",
    "   leading spaces",
    "numbers 12345 3.14159 1,000,000 0x1F 2024-01-01 ١٢٣",
    "I'm you'll they've she'd it's we're DON'T 'tis ''quoted'' ' s",
    f"before{_EOT}after {_EOT} {_EOT}{_EOT}\n{_EOT}",
    "<|endoftext|",  # almost a special token: ordinary text
    "control \x00\x01\x1c\x1d\x7f and odd spaces \u00a0\u2009\u3000\u2028\u200b end",
    "combining e\u0301 vs \u00e9, ligature \ufb01, math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa " * 3,
    "",
    " ",
    "\n",
]


@functools.lru_cache(maxsize=None)
def _gpt2() -> Tokenizer:
    return Tokenizer.from_files(_DATA / "gpt2_vocab.json", _DATA / "gpt2_merges.txt", [_EOT])


@functools.lru_cache(maxsize=None)
def _tiktoken_gpt2(tmp_dir: str):
    """tiktoken's GPT-2, loaded by tiktoken's own reader of GPT-2's files (offline)."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    # tiktoken's reader skips the first line of vocab.bpe, the "#version" header ours lacks
    merges = Path(tmp_dir) / "vocab.bpe"
    merges.write_text("#version: 0.2\n" + (_DATA / "gpt2_merges.txt").read_text("utf-8"), "utf-8")
    ranks = data_gym_to_mergeable_bpe_ranks(str(merges), str(_DATA / "gpt2_vocab.json"))
    return tiktoken.Encoding(name="gpt2_test", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={_EOT: 50256})


def _tiktoken(tmp_path_factory):
    return _tiktoken_gpt2(str(tmp_path_factory.getbasetemp()))


def _random_text(rng: random.Random, n: int, specials: list[str] = ()) -> str:
    """Text built to stress cuts: whitespace runs, contractions, digits, CJK, specials."""
    pieces = ["a", "b", "the", "The", " ", "  ", "\n", "\n\n", "\t", "\r\n", "'s", "'ll", "'",
              "0", "42", "!", "?!", ".", "é", "日本", "👋", "\u00a0", "\u3000", "x y"]
    pieces += specials
    return "".join(rng.choice(pieces) for _ in range(n))


def test_baselines_round_trip_and_compress():
    text = "the cat sat on the mat, 日本 👋 "
    assert CharTokenizer().decode(CharTokenizer().encode(text)) == text
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
    assert compression_ratio(text, ByteTokenizer()) == 1.0
    assert compression_ratio(text, CharTokenizer()) == len(text.encode("utf-8")) / len(text)
    words = WordTokenizer("the cat sat on the mat")
    assert words.decode(words.encode(" the cat")) == " the cat"
    assert words.encode(" the dog") == [words.word_to_id[" the"], 0]  # unseen word -> <unk>
    assert words.decode(words.encode(" the dog")) == " the<unk>"


def test_gpt2_ids_equal_tiktoken_on_hard_text(tmp_path_factory):
    encoding = _tiktoken(tmp_path_factory)
    tokenizer = _gpt2()
    shakespeare = (_DATA / "tinyshakespeare.txt").read_text("utf-8")[:50_000]
    rng = random.Random(0)
    blocks = [(0, 0x20), (0x20, 0x800), (0x3000, 0xA000), (0x1F300, 0x1FAFF)]  # no surrogates
    unicode_soup = "".join(chr(rng.randrange(*rng.choice(blocks))) for _ in range(3000))
    for text in [*_HARD_TEXTS, shakespeare, unicode_soup, _random_text(rng, 3000, [_EOT])]:
        ids = tokenizer.encode(text)
        assert ids == encoding.encode(text, allowed_special="all"), text[:80]
        assert tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == 50257 and tokenizer.token_id(_EOT) == 50256


def test_fast_bpe_equals_reference():
    shakespeare = (_DATA / "tinyshakespeare.txt").read_text("utf-8")[:30_000]
    vocab, merges = train_bpe(_DATA / "tinystories_sample.txt", 600, [_EOT], progress=False)
    for tokenizer in (_gpt2(), Tokenizer(vocab, merges, [_EOT])):
        for pretoken in set(regex.findall(_GPT2_PATTERN, shakespeare + "".join(_HARD_TEXTS))):
            assert tokenizer._bpe(pretoken) == tokenizer._bpe_reference(pretoken), pretoken


def test_trained_tokenizer_round_trips_hard_text():
    vocab, merges = train_bpe(_DATA / "tinystories_sample.txt", 400, [_EOT], progress=False)
    tokenizer = Tokenizer(vocab, merges, [_EOT])
    assert tokenizer.vocab_size == 400 and tokenizer.token_id(_EOT) == 399
    for text in _HARD_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    story = (_DATA / "tinystories_sample.txt").read_text("utf-8")
    assert compression_ratio(story, tokenizer) > 2.0  # merges were learned from this text


def test_overlapping_special_tokens_longest_wins():
    double = _EOT + _EOT
    for specials in ([_EOT, double], [double, _EOT]):
        tokenizer = Tokenizer(_gpt2().vocab, _gpt2().merges, specials)
        single_id, double_id = tokenizer.token_id(_EOT), tokenizer.token_id(double)
        assert single_id == 50256 and double_id == 50257  # a new special gets the next id
        hello = tokenizer.encode("hello")
        assert tokenizer.encode(f"hello{double}hello") == hello + [double_id] + hello
        assert tokenizer.encode(_EOT * 3) == [double_id, single_id]
        assert tokenizer.encode(f"{_EOT} {_EOT}") == [single_id, 220, single_id]
        text = f"a{_EOT * 5}b{_EOT}"
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_unknown_id_and_invalid_utf8_give_replacement():
    tokenizer = _gpt2()
    assert tokenizer.decode([31373, 10 ** 9, -1, 995]) == "hello\ufffd\ufffd world"
    byte_id = {token: i for i, token in tokenizer.vocab.items() if len(token) == 1}
    assert tokenizer.decode([byte_id[b"\x80"]]) == "\ufffd"  # a lone continuation byte
    assert tokenizer.decode([byte_id[b"\xc3"], 31373]) == "\ufffdhello"  # a cut-off character
    assert tokenizer.decode(np.array([31373, 995], dtype=np.uint16)) == "hello world"
    assert tokenizer.decode(torch.tensor([31373, 995])) == "hello world"
    with pytest.raises(TypeError):
        tokenizer.decode("hello")  # text, not ids: an error, not two U+FFFD


def test_long_pretokens_take_the_linear_path_and_encode_exactly(tmp_path_factory, monkeypatch):
    """A pre-token of 20,000 '=' or digits: the per-merge re-ranking of _bpe would be quadratic,
    so pre-tokens longer than LONG_PRETOKEN go to _bpe_reference, and short ones do not."""
    tokenizer, oracle = _gpt2(), _tiktoken(tmp_path_factory)
    lengths, reference = [], tokenizer._bpe_reference
    monkeypatch.setattr(tokenizer, "_bpe_reference",
                        lambda pretoken: lengths.append(len(pretoken)) or reference(pretoken))
    tokenizer._cache.clear()
    for text in ("=" * 20_000, "ab" * 10_000, "1" * 20_000):
        assert tokenizer.encode(text) == oracle.encode(text)
    assert lengths and all(n > LONG_PRETOKEN for n in lengths)
    assert tokenizer.encode("hello world") == oracle.encode("hello world")
    assert all(n > LONG_PRETOKEN for n in lengths)


def test_special_tokens_must_be_a_list():
    with pytest.raises(TypeError, match="list of strings"):
        Tokenizer(_gpt2().vocab, _gpt2().merges, _EOT)


def test_encode_iterable_buffer_shorter_than_a_special_token():
    specials = [_EOT, "<|im start here|>"]
    tokenizer = Tokenizer(_gpt2().vocab, _gpt2().merges, specials)
    pieces = ["x", "y<|im", " start", " here|>", " z"]
    assert (list(tokenizer.encode_iterable(pieces, buffer_chars=8))
            == tokenizer.encode("".join(pieces)))


@pytest.mark.parametrize("text, vocab_size, specials", [
    ("low low low low low lower lower newest newest newest newest newest newest widest widest "
     "widest", 270, []),
    ("ab ab cd cd ef ef gh gh ba ba dc dc", 280, []),  # every pair ties
    ("aaaaaaa aaaa aa a bbbbbb abababab", 300, []),  # overlapping pairs inside a word
    (f"hello{_EOT}world{_EOT} hello world{_EOT}{_EOT}x<|end", 290, [_EOT]),
    ("héllo wörld 日本語 日本 👋👋 café café", 300, ["<|a|>", "<|a|><|a|>"]),
])
def test_train_bpe_equals_reference(tmp_path, text, vocab_size, specials):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    expected = train_bpe_reference(path, vocab_size, specials)
    assert len(expected[1]) > 5  # the corpus has merges to learn
    assert train_bpe(path, vocab_size, specials, num_workers=1, progress=False) == expected


@pytest.mark.parametrize("name, chars, vocab_size", [
    ("corpus.en", 6000, 360), ("tinystories_sample.txt", 4000, 400),
    ("german.txt", 1000, 350), ("tinyshakespeare.txt", 8000, 400)])
def test_train_bpe_equals_reference_on_real_text_with_workers(tmp_path, name, chars, vocab_size):
    text = (_DATA / name).read_text("utf-8")[:chars].replace("\n", f"\n{_EOT}", 20)
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    expected = train_bpe_reference(path, vocab_size, [_EOT])
    assert len(expected[1]) > 80  # enough merges that ties and re-merges occur
    assert train_bpe(path, vocab_size, [_EOT], num_workers=2, progress=False) == expected


def test_train_ties_and_id_layout(tmp_path):
    path = tmp_path / "tie.txt"
    path.write_text("aa bb", encoding="utf-8")  # pairs (a,a), (' ',b), (b,b): one each
    vocab, merges = train_bpe(path, 258, [_EOT], progress=False)
    assert merges == [(b"b", b"b")]  # the greatest of the tied pairs
    assert vocab == {**{i: bytes([i]) for i in range(256)}, 256: b"bb", 257: _EOT.encode()}


def test_no_merge_spans_or_contains_a_special_token(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(f"x{_EOT}y " * 200 + f"{_EOT}{_EOT}xy", encoding="utf-8")
    vocab, merges = train_bpe(path, 300, [_EOT], progress=False)
    merged_tokens = [a + b for a, b in merges]
    assert merged_tokens, "the corpus has pairs to merge"
    for token in merged_tokens:  # only the text around the special tokens is ever merged
        assert set(token) <= set(b"xy "), token
    assert list(vocab.values()).count(_EOT.encode()) == 1


def test_save_load_round_trip_both_formats(tmp_path):
    vocab, merges = train_bpe(_DATA / "tinystories_sample.txt", 350, [_EOT, "<|pad|>"],
                              progress=False)
    tokenizer = Tokenizer(vocab, merges, [_EOT, "<|pad|>"])
    text = "Once upon a time 日本 <|pad|> there was" + _EOT
    for gpt2_format in (False, True):
        out = tmp_path / f"tok_{gpt2_format}"
        tokenizer.save_dir(out, gpt2_format=gpt2_format)
        loaded = Tokenizer.from_dir(out)
        assert loaded.vocab == tokenizer.vocab and loaded.merges == tokenizer.merges
        assert loaded.special_tokens == [_EOT, "<|pad|>"]
        assert loaded.fingerprint() == tokenizer.fingerprint()
        assert loaded.encode(text) == tokenizer.encode(text)
        assert sorted(p.name for p in out.iterdir()) == [
            "merges.txt", "special_tokens.json", "vocab.json"]  # no temporary files left
    assert Tokenizer(vocab, merges[:-1], [_EOT]).fingerprint() != tokenizer.fingerprint()


def test_gpt2_files_written_back_identically(tmp_path):
    _gpt2().save(tmp_path / "vocab.json", tmp_path / "merges.txt", gpt2_format=True)
    original = json.loads((_DATA / "gpt2_vocab.json").read_text("utf-8"))
    assert json.loads((tmp_path / "vocab.json").read_text("utf-8")) == original
    written = (tmp_path / "merges.txt").read_text("utf-8").splitlines()
    assert written[0] == "#version: 0.2"
    assert written[1:] == (_DATA / "gpt2_merges.txt").read_text("utf-8").splitlines()
    _gpt2().save(tmp_path / "ours.json", tmp_path / "ours.txt")  # our format, read back
    ours = Tokenizer.from_files(tmp_path / "ours.json", tmp_path / "ours.txt", [_EOT])
    assert ours.vocab == _gpt2().vocab and ours.encode("Hi there!") == [17250, 612, 0]


def test_token_dtype():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_encode_iterable_equals_encode():
    rng = random.Random(1)
    specials = [_EOT, _EOT + _EOT, "<|x y|>"]
    tokenizer = Tokenizer(_gpt2().vocab, _gpt2().merges, specials)
    for _ in range(6):
        text = _random_text(rng, 4000, specials)
        cuts = sorted(rng.sample(range(len(text)), 300))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        expected = tokenizer.encode(text)
        for buffer_chars in (1, 16, 500):
            assert list(tokenizer.encode_iterable(iter(pieces), buffer_chars)) == expected
    with open(_DATA / "tinyshakespeare.txt", encoding="utf-8") as f:
        streamed = list(_gpt2().encode_iterable(f, buffer_chars=10_000))
    assert streamed == _gpt2().encode((_DATA / "tinyshakespeare.txt").read_text("utf-8"))


def test_file_cuts_never_change_ids(tmp_path):
    rng = random.Random(2)
    specials = [_EOT, _EOT + _EOT, "<|x y|>"]
    tokenizer = Tokenizer(_gpt2().vocab, _gpt2().merges, specials)
    text = _random_text(rng, 20_000, specials)
    path = tmp_path / "tricky.txt"
    path.write_text(text, encoding="utf-8")
    data = path.read_bytes()
    bounds = _chunk_bounds(path, 200, specials)
    assert len(bounds) > 100  # the rule finds cuts in text without special tokens too
    ids = [i for a, b in zip(bounds, bounds[1:]) for i in tokenizer.encode(data[a:b].decode())]
    assert ids == tokenizer.encode(text)


def test_encode_file_two_workers_equal_one_process(tmp_path):
    tokenizer = _gpt2()
    text = (_DATA / "tinyshakespeare.txt").read_text("utf-8")[:200_000] + _HARD_TEXTS[2] * 50
    path = tmp_path / "input.txt"
    path.write_text(text.replace("\n\n", f"\n{_EOT}\n", 50), encoding="utf-8")
    expected = np.array(tokenizer.encode(path.read_text("utf-8")), dtype=np.uint16)
    for workers in (1, 2):
        out = tmp_path / f"out{workers}.bin"
        assert encode_file(tokenizer, path, out, num_workers=workers, progress=False) == len(
            expected)
        assert np.array_equal(np.fromfile(out, dtype=np.uint16), expected)
        assert json.loads(Path(f"{out}.json").read_text()) == {
            "dtype": "uint16", "vocab_size": 50257, "num_tokens": len(expected),
            "tokenizer": tokenizer.fingerprint()}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "input.txt", "out1.bin", "out1.bin.json", "out2.bin", "out2.bin.json"]


def test_encode_iterable_memory_stays_flat():
    tokenizer = _gpt2()
    lines = (_DATA / "tinyshakespeare.txt").read_text("utf-8").splitlines(keepends=True)[:2000]
    total_chars = 4_000_000

    def stream():
        emitted = 0
        while emitted < total_chars:
            for line in lines:
                emitted += len(line)
                yield line

    tokenizer.encode("".join(lines))  # fill the cache first: it is bounded separately
    tracemalloc.start()
    num_tokens = sum(1 for _ in tokenizer.encode_iterable(stream(), buffer_chars=1 << 16))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert num_tokens > 900_000  # a list of these ids alone would take over 7 MB
    assert peak < 3_000_000, f"peak {peak:,} bytes while streaming {total_chars:,} chars"


_MEMORY_CAPPED_STREAM = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import tokenizer
data, copies = Path(sys.argv[2]), int(sys.argv[3])
tok = tokenizer.gpt2_tokenizer(data)
lines = (data / "tinyshakespeare.txt").read_text("utf-8").splitlines(keepends=True)
tok.encode("".join(lines[:5000]))  # warm the pre-token cache before the cap
def stream():
    for _ in range(copies):
        yield from lines
status = open("/proc/self/status").read()
vm = int(status.split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))
print(sum(1 for _ in tok.encode_iterable(stream())))
try:
    tok.encode("".join(stream()))
    print("whole text fits")
except MemoryError:
    print("whole text: MemoryError")
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_encode_iterable_runs_under_an_os_memory_limit(tmp_path):
    """30 copies of tinyshakespeare (33 MB, 10M tokens) stream through encode_iterable with the
    address space capped 64 MB above its size at the start; the same text encoded at once does
    not fit under that cap, so the cap is real."""
    script = tmp_path / "capped.py"
    script.write_text(_MEMORY_CAPPED_STREAM)
    root = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, str(script), str(root), str(_DATA), "30"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    count, whole = result.stdout.split("\n")[:2]
    assert int(count) > 10_000_000  # as Python ints in a list, these alone would need 80+ MB
    assert whole == "whole text: MemoryError"


def test_train_bad_input(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello world", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_size=256 is smaller"):
        train_bpe(good, 256, [_EOT], progress=False)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe(tmp_path / "missing.txt", 300, [], progress=False)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        train_bpe(tmp_path / "empty.txt", 300, [], progress=False)
    with pytest.raises(ValueError, match="non-empty strings"):
        train_bpe(good, 300, [""], progress=False)
    bad = tmp_path / "bad.txt"
    prefix = ("hello world " * 5000).encode()
    bad.write_bytes(prefix + b"\xff\xfe tail words " * 10)
    for workers in (1, 2):
        with pytest.raises(ValueError, match=f"bad.txt: not valid UTF-8 at byte offset "
                                             f"{len(prefix)}"):
            train_bpe(bad, 300, [], num_workers=workers, progress=False)


def test_encode_file_bad_input_keeps_existing_output(tmp_path):
    tokenizer = _gpt2()
    out = tmp_path / "out.bin"
    out.write_bytes(b"precious")
    bad = tmp_path / "bad.txt"
    prefix = ("some text\n" * 20_000).encode()
    bad.write_bytes(prefix + b"caf\xe9 " * 10)
    with pytest.raises(ValueError, match=f"offset {len(prefix) + 3}"):
        encode_file(tokenizer, bad, out, num_workers=2, progress=False)
    with pytest.raises(FileNotFoundError):
        encode_file(tokenizer, tmp_path / "missing.txt", out, progress=False)
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "out.bin"]


def test_malformed_tokenizer_files(tmp_path):
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\nĠ t\n", encoding="utf-8")
    byte_vocab = {str(b): _to_char(b) for b in range(256)}
    cases = {
        "not json {": "not valid JSON",
        "[1, 2]": "non-empty JSON object",
        json.dumps({"a": 0, "b": "x"}): "token -> id",
        json.dumps({"0": "a\u4e00"}): "not in GPT-2's byte-to-unicode table",
        json.dumps({**byte_vocab, "300": "Ġt"}): "ids must be 0..",
        json.dumps({k: v for k, v in byte_vocab.items() if k != "65"}): "ids must be 0..",
    }
    vocab = tmp_path / "vocab.json"
    for content, message in cases.items():
        vocab.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            Tokenizer.from_files(vocab, merges)
    vocab.write_text(json.dumps(byte_vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="uses a token not in the vocabulary"):
        Tokenizer.from_files(vocab, merges)  # "Ġt" is not in a bytes-only vocabulary
    merges.write_text("#version: 0.2\nĠ t x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected two tokens"):
        Tokenizer.from_files(vocab, merges)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a special token"):
        _gpt2().token_id("<|pad|>")


def _to_char(b: int) -> str:
    """GPT-2's byte-to-unicode table, written again: printable Latin-1 stays, the rest shifts."""
    printable = [c for c in range(256) if chr(c).isprintable() and chr(c) != " "]
    if b in printable:
        return chr(b)
    return chr(256 + [c for c in range(256) if c not in printable].index(b))


def test_cli_train_encode_compare(tmp_path, monkeypatch, capsys):
    corpus = _DATA / "tinystories_sample.txt"
    out = tmp_path / "tok"
    main(["train", f"--input={corpus}", "--vocab_size=300", f"--special_tokens={_EOT}",
          f"--out={out}", "--workers=1"])
    tokenizer = Tokenizer.from_dir(out)
    assert tokenizer.vocab_size == 300 and tokenizer.special_tokens == [_EOT]
    main(["encode", f"--tokenizer={out}", f"--input={corpus}", f"--out={tmp_path / 'tok.bin'}"])
    ids = np.fromfile(tmp_path / "tok.bin", dtype=np.uint16)
    assert ids.tolist() == tokenizer.encode(corpus.read_text("utf-8"))
    main(["compare", str(corpus), "--vocab_size=300"])  # a positional FILE works too
    printed = capsys.readouterr().out
    for name in ("characters", "bytes", "words", "BPE trained here (300)", "BPE GPT-2"):
        assert name in printed
    main(["--help"])
    assert capsys.readouterr().out.startswith("Stage 1: a byte-level BPE tokenizer")
    monkeypatch.setattr("tokenizer.tour", lambda: print("the tour"))
    main([])  # no arguments: the tour
    main(["tour"])
    assert capsys.readouterr().out == "the tour\nthe tour\n"


_TOUR_SECTIONS_1_TO_3 = [
    "1. One string, four tokenizers: 'Hello 👋 世界!', 18 UTF-8 bytes",
    "  characters               vocab 1,114,112  1.64 bytes/token  "
    "ids [72, 101, 108, 108, 111, 32, 128075, 32, 19990, 30028, 33]",
    "  bytes                    vocab       256  1.00 bytes/token  "
    "ids [72, 101, 108, 108, 111, 32, 240, 159, 145, 139, 32, 228, 184, 150, 231, 149, 140, 33]",
    "  words of tinyshakespeare vocab    15,058  4.50 bytes/token  ids [0, 0, 0, 11271]",
    "  BPE GPT-2                vocab    50,257  2.00 bytes/token  "
    "ids [15496, 50169, 233, 220, 10310, 244, 45911, 234, 0]",
    "  words decode back to '<unk><unk><unk>!': unseen words are lost",
    r"  GPT-2's tokens are bytes, not characters: [b'Hello', b' \xf0\x9f\x91', b'\x8b', b' ', "
    r"b'\xe4\xb8', b'\x96', b'\xe7\x95', b'\x8c', b'!']",
    "",
    "2. BPE learns merges from counts, here on 'the cat in the hat. the cat sat on the mat.'",
    "  merge 1: 'a' + 't' -> 'at'  (count 5)",
    "  merge 2: 't' + 'h' -> 'th'  (count 4)",
    "  merge 3: 'th' + 'e' -> 'the'  (count 4)",
    "  merge 4: ' ' + 'the' -> ' the'  (count 3)",
    "  merge 5: 'c' + 'at' -> 'cat'  (count 2)",
    "  merge 6: ' ' + 'cat' -> ' cat'  (count 2)",
    "  merge 7: 's' + 'at' -> 'sat'  (count 1)",  # ties go to the greater pair of bytes
    "  merge 8: 'o' + 'n' -> 'on'  (count 1)",
    "  merge 9: 'm' + 'at' -> 'mat'  (count 1)",
    "  merge 10: 'i' + 'n' -> 'in'  (count 1)",
    "  the text becomes 19 tokens: 'the' ' cat' ' ' 'in' ' the' ' ' 'h' 'at' '.' ' the' ' cat' ' ' "
    "'sat' ' ' 'on' ' the' ' ' 'mat' '.'",
    "",
    "3. What GPT-2's pre-tokenization prevents: the same 10 merges without it span words and "
    "punctuation",
    "  without: 'at' 'th' 'the' 'the ' 'at ' ' the ' 'n the ' 'cat ' 'at.' 'the cat '",
    "  with:    'at' 'th' 'the' ' the' 'cat' ' cat' 'sat' 'on' 'mat' 'in'",
    "  because BPE then merges only inside the pre-tokens ['the', ' cat', ' in', ' the', ' hat', "
    "'.', ' the', ' cat', ' sat', ' on', ' the', ' mat', '.']",
    "",
    "4. Compression on a real file (BPE trained here with vocab 1000):",
]

_TOUR_TABLE = [
    "tokenizer                  vocab size     tokens bytes/token",
    "characters                  1,114,112  1,115,394        1.00",
    "bytes (UTF-8)                     256  1,115,394        1.00",
    "words (+ <unk>)                15,058    297,833        3.75",
    "BPE trained here (1000)         1,000    462,759        2.41",
    "BPE GPT-2                      50,257    338,025        3.30",
]


def test_tour_prints_the_lecture(capsys):
    tour()
    lines = capsys.readouterr().out.splitlines()
    assert lines[: len(_TOUR_SECTIONS_1_TO_3)] == _TOUR_SECTIONS_1_TO_3
    assert lines[-len(_TOUR_TABLE) - 1].endswith("tinyshakespeare.txt: 1,115,394 bytes")
    assert lines[-len(_TOUR_TABLE):] == _TOUR_TABLE


@pytest.mark.parametrize("argv, code, message", [
    (["nonsense"], 2, "unknown command 'nonsense'; the commands are tour, train, encode, compare, "
                      "bench"),
    (["train", "--input=x.txt"], 2, "train needs --out=...; see python tokenizer.py --help"),
    (["train", "--vocab_sise=300"], 2, "unknown option --vocab_sise; did you mean --vocab_size?"),
    (["train", "--vocab_size=many"], 2, "--vocab_size expects an integer, got 'many'"),
    (["compare", "a.txt", "b.txt"], 2, "unexpected argument 'b.txt'; settings are --key=value"),
    (["compare", "--input=missing.txt"], 1, "input file not found: missing.txt"),
    (["encode", "--tokenizer=nowhere", "--input=x", "--out=y"], 1,
     "tokenizer directory not found: nowhere"),
])
def test_tokenizer_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, code, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == code
    assert capsys.readouterr().err == f"error: {message}\n"
    with pytest.raises(UsageError if code == 2 else Exception):
        run_cli(main, [*argv, "--debug"])  # --debug: the exception with its traceback


def test_options_take_the_type_of_their_default():
    """Literals, never exec; a list option takes one value (`infer.py bench --batch_sizes=1`, as
    its docstring writes it, once failed with "expects a list"), commas or a list literal."""
    assert typed("b", "1", []) == [1] and typed("b", "1,16", []) == typed("b", "[1, 16]", [])
    assert typed("s", "a,b", []) == ["a", "b"] and typed("t", "4", (1, 2)) == (4,)
    assert typed("lr", "1", 0.1) == 1.0 and typed("n", "1e4", 1) == 10_000
    assert typed("c", "false", True) is False and typed("x", "2", None) == 2
    for value, default, message in [("True", [], "a list, got True"), ("x", 1, "integer"),
                                    ("1.5", 1, "integer, got 1.5"),
                                    ("__import__('os')", 1, 'integer, got "__import__')]:
        with pytest.raises(UsageError, match=message):
            typed("k", value, default)


def _fail(*args, **kwargs):
    pytest.fail("the expensive work started before the checks failed")


def test_cli_train_checks_everything_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tokenizer.train_bpe", _fail)
    good, latin1, a_file = tmp_path / "good.txt", tmp_path / "latin1.txt", tmp_path / "a_file"
    good.write_text("hello world", encoding="utf-8")
    latin1.write_bytes(b"caf\xe9 au lait")
    a_file.write_text("")
    out = tmp_path / "tok"
    cases = [([f"--input={latin1}", f"--out={out}"], f"{latin1}: not valid UTF-8 at byte offset 3"),
             ([f"--input={tmp_path / 'no.txt'}", f"--out={out}"], "input file not found: "),
             ([f"--input={good}", "--vocab_size=200", f"--out={out}"], "vocab_size=200 is smaller"),
             ([f"--input={good}", f"--out={a_file / 'tok'}"], f"cannot write to {a_file}/tok: ")]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, ["train", *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.startswith(f"error: {message}"), err
        assert err.count("\n") == 1
    assert not out.exists()  # bad input creates no output folder


@pytest.mark.parametrize("command", ["train", "encode"])
def test_read_only_out_fails_before_the_work(tmp_path, monkeypatch, capsys, command):
    """Both commands fail at once, naming the folder; as root (who may write anywhere) the probe
    write is made to fail the way it would for anyone else."""
    monkeypatch.setattr("tokenizer.train_bpe", _fail)
    monkeypatch.setattr("tokenizer._map_chunks", _fail)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    if os.geteuid() == 0:
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr("tempfile.TemporaryFile", denied)
    Tokenizer({i: bytes([i]) for i in range(256)}, []).save_dir(tmp_path / "tok")
    corpus = _DATA / "tinystories_sample.txt"
    args = {"train": [f"--input={corpus}", f"--out={read_only / 'tok'}"],
            "encode": [f"--tokenizer={tmp_path / 'tok'}", f"--input={corpus}",
                       f"--out={read_only / 'ids.bin'}"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [command, *args])
    where = read_only / "tok" if command == "train" else read_only
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"error: cannot write to {where}: Permission denied\n"
    read_only.chmod(0o700)


_BYTE_VOCAB = {i: bytes([i]) for i in range(256)}


def test_interrupted_encode_keeps_the_old_output_and_no_temp_file(tmp_path, monkeypatch):
    tokenizer = Tokenizer(_BYTE_VOCAB, [])  # one id per byte
    corpus, out = tmp_path / "corpus.txt", tmp_path / "ids.bin"
    corpus.write_text("hello world\n" * 1000, encoding="utf-8")
    out.write_bytes(b"an earlier run")
    (tmp_path / "ids.bin.tmp").write_bytes(b"left behind by kill -9")

    def interrupt(text):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the encoding

    monkeypatch.setattr(tokenizer, "encode", interrupt)
    with pytest.raises(KeyboardInterrupt):
        encode_file(tokenizer, corpus, out, num_workers=1, progress=False)
    assert out.read_bytes() == b"an earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "ids.bin"]
    monkeypatch.undo()
    (tmp_path / "ids.bin.tmp").write_bytes(b"left behind by kill -9")
    assert encode_file(tokenizer, corpus, out, num_workers=1, progress=False) == 12_000
    assert np.fromfile(out, np.uint16).tolist() == list(corpus.read_bytes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "ids.bin", "ids.bin.json"]


@pytest.mark.parametrize("interrupted", ["vocab.json", "merges.txt", "special_tokens.json"])
def test_interrupted_save_keeps_the_old_files(tmp_path, monkeypatch, interrupted):
    """Ctrl-C while any of the three files is written: the old tokenizer stays whole (no new
    vocab.json beside an old merges.txt) and no temp file is left."""
    Tokenizer(_BYTE_VOCAB, []).save_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write_text = Path.write_text

    def write_or_interrupt(self, *args, **kwargs):
        if self.name.startswith(interrupted):
            raise KeyboardInterrupt
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_or_interrupt)
    with pytest.raises(KeyboardInterrupt):
        Tokenizer({**_BYTE_VOCAB, 256: b"ab"}, [(b"a", b"b")], [_EOT]).save_dir(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# =================================================================================================
# model.py
# =================================================================================================

_TINY = dict(vocab_size=64, context_length=32, d_model=32, num_layers=2, num_heads=4, d_ff=64)


_VARIANTS = {
    "default": {},
    "layernorm": dict(norm="layernorm"),
    "no_norm": dict(norm="none"),
    "post_norm": dict(norm_position="post"),
    "gelu": dict(ffn="gelu"),
    "relu": dict(ffn="relu"),
    "sinusoidal": dict(positions="sinusoidal"),
    "learned": dict(positions="learned"),
    "nope": dict(positions="none"),
    "sliding_window": dict(sliding_window=4),
    "linear_attention": dict(mixer="linear_attention"),
    "gqa": dict(num_kv_heads=2),
    "mqa": dict(num_kv_heads=1),
    "mla": dict(kv_latent_dim=16),
    "moe": dict(num_experts=4, experts_top_k=2, shared_expert=True),
    "tied": dict(tie_weights=True),
    "hyena": dict(mixer="hyena"),
    "manual_attention": dict(attn_impl="manual"),
}


_CACHED = [name for name in _VARIANTS if name != "hyena"]


def _model(seed: int = 0, **overrides) -> M.TransformerLM:
    torch.manual_seed(seed)
    return M.TransformerLM(M.ModelConfig(**{**_TINY, **overrides}))


def _tokens(shape: tuple, seed: int = 1, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_linear_embedding_match_torch_and_init():
    torch.manual_seed(0)
    linear, x = M.Linear(300, 200), torch.randn(2, 5, 300)
    assert linear.weight.shape == (200, 300)
    torch.testing.assert_close(linear(x), F.linear(x, linear.weight))
    std = math.sqrt(2 / 500)
    assert linear.weight.abs().max() <= 3 * std + 1e-6
    assert abs(linear.weight.std().item() - std * 0.9866) < 0.05 * std  # truncation shrinks std
    embedding, ids = M.Embedding(100, 16), _tokens((3, 7), vocab=100)
    torch.testing.assert_close(embedding(ids), F.embedding(ids, embedding.weight))
    assert embedding.weight.abs().max() <= 3.0 + 1e-6


def test_norms_match_torch_and_keep_dtype():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 32) * 3 + 1
    rms = M.RMSNorm(32)
    rms.weight.data = torch.randn(32)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * rms.weight
    torch.testing.assert_close(rms(x), expected)
    if hasattr(F, "rms_norm"):
        torch.testing.assert_close(rms(x), F.rms_norm(x, (32,), rms.weight, eps=1e-5))
    assert rms(x.bfloat16()).dtype == torch.bfloat16
    ln = M.LayerNorm(32)
    ln.weight.data, ln.bias.data = torch.randn(32), torch.randn(32)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (32,), ln.weight, ln.bias, eps=1e-5))


def test_stacked_linear_is_the_layers_side_by_side():
    """Training: one matmul on the stacked weights, each layer's output and gradients. Without
    gradients, or with a bias, the layers run one by one (their hooks fire: FSDP gathers there)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    for bias in (False, True):
        layers = [M.Linear(8, n, bias) for n in (8, 4, 4)]
        calls = []
        for layer in layers:
            layer.register_forward_hook(lambda *_: calls.append(1))
        weights = [x] + [p for layer in layers for p in layer.parameters()]
        got, want = M.stacked_linear(x, *layers), torch.cat([m(x) for m in layers], dim=-1)
        assert len(calls) == (6 if bias else 3)  # the stacked matmul called no layer
        torch.testing.assert_close(got, want)
        for g, w in zip(torch.autograd.grad(got.square().sum(), weights),
                        torch.autograd.grad(want.square().sum(), weights), strict=True):
            torch.testing.assert_close(g, w)
        with torch.no_grad():
            torch.testing.assert_close(M.stacked_linear(x, *layers), want)
        assert len(calls) == (9 if bias else 6)


def test_activations_and_ffns_match_torch():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    big = torch.tensor([[1000.0, 0.0, -1000.0], [1e4, 1e4, 1e4]])
    torch.testing.assert_close(M.softmax(big, dim=-1), torch.softmax(big, dim=-1))
    torch.testing.assert_close(M.softmax(x, dim=1), torch.softmax(x, dim=1))
    torch.testing.assert_close(M.silu(x), F.silu(x))
    torch.testing.assert_close(M.gelu(x), F.gelu(x))
    swiglu = M.SwiGLU(16, 24)
    expected = F.linear(F.silu(F.linear(x, swiglu.w1.weight)) * F.linear(x, swiglu.w3.weight),
                        swiglu.w2.weight)
    torch.testing.assert_close(swiglu(x), expected)
    for name, act in (("relu", F.relu), ("gelu", F.gelu)):
        ffn = M.FeedForward(16, 24, name)
        torch.testing.assert_close(ffn(x), F.linear(act(F.linear(x, ffn.w1.weight)),
                                                    ffn.w2.weight))


def test_scaled_dot_product_attention_matches_torch():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 6)
    torch.testing.assert_close(M.scaled_dot_product_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v))
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True  # every query sees something
    torch.testing.assert_close(M.scaled_dot_product_attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    q3 = torch.randn(4, 5, 8)  # any leading dims
    torch.testing.assert_close(M.scaled_dot_product_attention(q3, q3, q3),
                               F.scaled_dot_product_attention(q3, q3, q3))


def test_rope_matches_rotation_matrices_and_is_relative():
    torch.manual_seed(0)
    d_k, theta, seq_len = 8, 100.0, 6
    rope = M.RotaryEmbedding(theta, d_k, max_seq_len=16)
    x, positions = torch.randn(2, seq_len, d_k), torch.tensor([[0, 1, 2, 3, 4, 5],
                                                               [9, 3, 15, 0, 7, 7]])
    expected = torch.empty_like(x)
    for b in range(2):
        for t in range(seq_len):
            rotation = torch.zeros(d_k, d_k)
            for i in range(d_k // 2):
                angle = positions[b, t].item() * theta ** (-2 * i / d_k)
                c, s = math.cos(angle), math.sin(angle)
                rotation[2 * i: 2 * i + 2, 2 * i: 2 * i + 2] = torch.tensor([[c, -s], [s, c]])
            expected[b, t] = rotation @ x[b, t]
    torch.testing.assert_close(rope(x, positions), expected)
    torch.testing.assert_close(rope(x), rope(x, torch.arange(seq_len)))
    q, k = torch.randn(d_k), torch.randn(d_k)

    def score(i: int, j: int) -> torch.Tensor:
        return rope(q[None], torch.tensor([i]))[0] @ rope(k[None], torch.tensor([j]))[0]

    torch.testing.assert_close(score(3, 1), score(12, 10))
    torch.testing.assert_close(score(7, 7), q @ k)
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_sinusoidal_table_known_values():
    table = M.sinusoidal_table(10, 6)
    assert table[0].tolist() == [0, 1, 0, 1, 0, 1]
    assert table[3, 2].item() == pytest.approx(math.sin(3 / 10000 ** (2 / 6)), abs=1e-6)
    assert table[3, 5].item() == pytest.approx(math.cos(3 / 10000 ** (4 / 6)), abs=1e-6)


@pytest.mark.parametrize("overrides", [{}, dict(num_kv_heads=2), dict(sliding_window=3),
                                       dict(kv_latent_dim=16)])
def test_manual_attention_equals_sdpa(overrides):
    ids = _tokens((2, 20))
    reference = _model(attn_impl="manual", **overrides)
    fast = M.TransformerLM(M.ModelConfig(**{**_TINY, **overrides}))
    fast.load_state_dict(reference.state_dict())
    torch.testing.assert_close(fast(ids), reference(ids), atol=1e-5, rtol=1e-5)


def test_attention_module_matches_brute_force():
    """MultiHeadSelfAttention without RoPE against torch's MultiheadAttention-style maths."""
    torch.manual_seed(0)
    attn, x = M.MultiHeadSelfAttention(16, 4, use_rope=False), torch.randn(2, 9, 16)
    q, k, v = (F.linear(x, p.weight).view(2, 9, 4, 4).transpose(1, 2)
               for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 9, 16)
    torch.testing.assert_close(attn(x), F.linear(out, attn.output_proj.weight))


@pytest.mark.parametrize("name", list(_VARIANTS))
def test_causality(name):
    """Changing a future token never changes an earlier output."""
    model = _model(**_VARIANTS[name])
    ids = _tokens((2, 16))
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_gqa_equals_mha():
    ids = _tokens((2, 12))
    mha = _model()
    same = M.TransformerLM(M.ModelConfig(**_TINY, num_kv_heads=4))
    same.load_state_dict(mha.state_dict())
    torch.testing.assert_close(same(ids), mha(ids))
    # Grouped: 2 kv heads shared by 2 query heads each == MHA whose k/v heads are copies.
    gqa = _model(num_kv_heads=2)
    state = gqa.state_dict()
    for i in range(2):
        for name in ("k_proj", "v_proj"):
            w = state[f"layers.{i}.attn.{name}.weight"].view(2, 8, 32)
            state[f"layers.{i}.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    torch.testing.assert_close(mha(ids), gqa(ids), atol=1e-5, rtol=1e-5)
    assert gqa.layers[0].attn.k_proj.weight.shape == (16, 32)


def test_moe_with_identical_experts_equals_dense_ffn():
    torch.manual_seed(0)
    config = M.ModelConfig(**_TINY, num_experts=4, experts_top_k=2)
    moe, dense = M.MixtureOfExperts(config), M.SwiGLU(32, 64)
    for expert in moe.experts:
        expert.load_state_dict(dense.state_dict())
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)
    probs = torch.softmax(x.reshape(-1, 32) @ moe.router.weight.T, dim=-1)
    share = F.one_hot(probs.topk(2).indices, 4).float().sum((0, 1)) / (21 * 2)
    expected = config.moe_aux_loss_coef * 4 * (share * probs.mean(0)).sum()
    torch.testing.assert_close(moe.aux_loss, expected)
    moe.router.weight.data.zero_()  # uniform router probabilities: E * sum_e f_e / E = 1
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(config.moe_aux_loss_coef)


def test_moe_aux_loss_known_value():
    """A router whose probabilities are chosen: feature e of each token is log p_e and the router
    reads features 0..3, so softmax gives p back exactly and the Switch loss is known by hand."""
    config = M.ModelConfig(**_TINY, num_experts=4, experts_top_k=2, moe_aux_loss_coef=0.5)
    moe = M.MixtureOfExperts(config)
    moe.router.weight.data = torch.eye(4, 32)
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1],  # top-2: experts 0 and 1
                          [0.4, 0.3, 0.2, 0.1],  # experts 0 and 1
                          [0.1, 0.5, 0.3, 0.1]])  # experts 1 and 2
    x = torch.zeros(3, 32)
    x[:, :4] = probs.log()
    moe(x)
    # f_e = assignments / (N k) = (2, 3, 1, 0) / 6; P_e = mean prob. = (0.9, 1.1, 0.7, 0.3) / 3
    # loss = coef * E * sum_e f_e P_e = 0.5 * 4 * (2 * 0.9 + 3 * 1.1 + 1 * 0.7) / 18 = 11.6 / 18
    assert moe.aux_loss.item() == pytest.approx(11.6 / 18, rel=1e-6)
    moe.top_k = 1  # all three tokens to experts 0, 0, 1: f = (2/3, 1/3, 0, 0)
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(0.5 * 4 * (2 * 0.9 + 1 * 1.1) / 9, rel=1e-6)


def test_moe_routes_to_top_k_only():
    torch.manual_seed(0)
    config = M.ModelConfig(**_TINY, num_experts=4, experts_top_k=1)
    moe, x = M.MixtureOfExperts(config), torch.randn(10, 32)
    choice = (x @ moe.router.weight.T).argmax(-1)
    expected = torch.stack([moe.experts[int(e)](row) for e, row in zip(choice, x)])
    torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)


def test_sliding_window_at_least_sequence_equals_full():
    ids = _tokens((2, 16))
    full = _model()
    windowed = M.TransformerLM(M.ModelConfig(**_TINY, sliding_window=16))
    windowed.load_state_dict(full.state_dict())
    torch.testing.assert_close(windowed(ids), full(ids), atol=1e-5, rtol=1e-5)
    short = M.TransformerLM(M.ModelConfig(**_TINY, sliding_window=4))
    short.load_state_dict(full.state_dict())
    out = short(ids)
    torch.testing.assert_close(out[:, :4], full(ids)[:, :4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:, 4:], full(ids)[:, 4:])


def test_sliding_window_mask_brute_force():
    mask = M.attention_mask(5, 8, start=3, window=3)
    expected = torch.tensor([[3 + i - 3 < j <= 3 + i for j in range(8)] for i in range(5)])
    assert torch.equal(mask, expected)


def test_linear_attention_recurrent_equals_quadratic():
    torch.manual_seed(0)
    q, k, v = (M.linear_attention_feature_map(torch.randn(2, 3, 10, 4)) for _ in range(3))
    quadratic, _, _ = M.causal_linear_attention(q, k, v)
    torch.testing.assert_close(quadratic, M.causal_linear_attention_recurrent(q, k, v))
    # continuing from a state equals one pass over the whole sequence
    state, normalizer = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4)
    first, state, normalizer = M.causal_linear_attention(q[..., :6, :], k[..., :6, :],
                                                         v[..., :6, :], state, normalizer)
    second, _, _ = M.causal_linear_attention(q[..., 6:, :], k[..., 6:, :], v[..., 6:, :],
                                             state, normalizer)
    torch.testing.assert_close(torch.cat((first, second), -2), quadratic)


def test_fft_convolution_equals_direct():
    torch.manual_seed(0)
    u, h = torch.randn(2, 3, 17), torch.randn(3, 17)
    torch.testing.assert_close(M.fft_causal_conv(u, h), M.causal_conv_direct(u, h),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", _CACHED)
def test_incremental_decoding_matches_full_forward(name):
    model = _model(**_VARIANTS[name])
    ids = _tokens((3, 20))
    full = model(ids)
    cache = model.make_kv_cache(3)
    steps = [model(ids[:, :8], kv_cache=cache)]
    steps += [model(ids[:, t: t + 1], positions=torch.tensor([t]), kv_cache=cache)
              for t in range(8, 20)]
    assert cache.seq_len == 20
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    cache.reset()
    torch.testing.assert_close(model(ids[:, :5], kv_cache=cache), full[:, :5], atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("name", ["default", "mla"])
def test_incremental_decoding_with_per_row_positions(name):
    """Positions (B, T) shift RoPE per row; the cache must agree with the full forward."""
    model = _model(**_VARIANTS[name])
    ids, offsets = _tokens((2, 10)), torch.tensor([[0], [5]])
    positions = torch.arange(10) + offsets
    full = model(ids, positions=positions)
    cache = model.make_kv_cache(2, max_seq_len=10)
    out = [model(ids[:, :4], positions=positions[:, :4], kv_cache=cache)]
    out += [model(ids[:, t:t + 1], positions=positions[:, t:t + 1], kv_cache=cache)
            for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-4, rtol=1e-4)


def test_hyena_cache_not_implemented():
    with pytest.raises(NotImplementedError, match="hyena"):
        _model(mixer="hyena").make_kv_cache(1)


def test_generate_greedy_matches_naive_loop():
    model = _model()
    prompt = _tokens((2, 5))
    out = M.generate(model, prompt, max_new_tokens=8, temperature=0)
    expected = prompt
    for _ in range(8):
        next_id = model(expected)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat((expected, next_id), 1)
    assert torch.equal(out, expected)


def test_generate_sampling_eos_and_long_outputs():
    model = _model()
    prompt = _tokens((2, 4))
    torch.manual_seed(0)
    sampled = M.generate(model, prompt, max_new_tokens=40, temperature=1.0, top_k=5)
    assert sampled.shape == (2, 44) and torch.equal(sampled[:, :4], prompt)  # > context 32
    logits = model(sampled[:, :10])[:, -1]  # every sample is among the top 5 at its step
    assert all(sampled[b, 10] in logits[b].topk(5).indices for b in range(2))
    first = M.generate(model, prompt, 1, temperature=0)[:, -1]
    stopped = M.generate(model, prompt, 10, temperature=0, eos_id=int(first[0]))
    assert (stopped[0, 4:] == first[0]).all()
    hyena = M.generate(_model(mixer="hyena"), prompt, 6, temperature=0)
    assert hyena.shape == (2, 10)


@pytest.mark.parametrize("name", list(_VARIANTS))
def test_each_variant_trains(name):
    model = _model(**_VARIANTS[name])
    batch = _tokens((4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 64), batch[:, 1:].reshape(-1))
        losses.append(loss.item())
        optimizer.zero_grad()
        (loss + model.aux_loss).backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0], losses


def test_moe_aux_loss_is_left_on_model():
    model = _model(num_experts=4)
    model(_tokens((2, 8)))
    assert model.aux_loss.requires_grad and model.aux_loss.item() > 0
    dense = _model()
    dense(_tokens((2, 8)))
    assert dense.aux_loss.item() == 0


def test_compile_fullgraph_default():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    model = _model()
    ids = _tokens((2, 16))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # traces fwd + bwd
    out = compiled(ids)
    out.float().pow(2).mean().backward()
    torch.testing.assert_close(out, model(ids))
    assert model.lm_head.weight.grad is not None
    restored = _model(seed=5)
    restored.load_state_dict(compiled.state_dict())  # keys carry the _orig_mod. prefix
    torch.testing.assert_close(restored(ids), model(ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_compiled_model_equals_eager_on_cuda(dtype, bound):
    """The GPU training path (sdpa attention, torch.compile fullgraph with inductor, bf16
    autocast) computes what eager does: logits and every gradient agree to the dtype's rounding,
    measured as the relative error of the whole tensor."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: fp32 should agree to ~1e-6
    try:
        torch.manual_seed(0)
        model = M.TransformerLM(M.ModelConfig.preset("tiny", vocab_size=512)).cuda()
        compiled = torch.compile(model, fullgraph=True)
        ids = _tokens((4, 129), vocab=512).cuda()
        results = []
        for net in (model, compiled):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                logits = net(ids[:, :-1])
            F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
            results.append([logits.float()] + [p.grad.clone() for p in model.parameters()])
    finally:
        torch.set_float32_matmul_precision(precision)
    for eager, fast in zip(*results):
        assert ((fast - eager).norm() / eager.norm()).item() < bound


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_triton_attention_model_equals_manual(num_kv_heads, monkeypatch):
    """attn_impl="triton" (kernels.py's FlashAttention, in Triton's interpreter on a CPU, GQA
    inside the kernel) gives the hand-written attention's logits and gradients, and reads
    model.py's q, k, v and the output's gradient where they lie: no copies."""
    copies, readable = [], kernels._readable

    def counting(x, strides):
        y = readable(x, strides)
        copies.extend([tuple(x.stride())] if y is not x else [])
        return y
    monkeypatch.setattr(kernels, "_readable", counting)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = _tokens((2, 20), vocab=64).to(device)
    models = [_model(attn_impl=impl, vocab_size=64, context_length=32, d_model=64, num_heads=4,
                     num_kv_heads=num_kv_heads).to(device) for impl in ("manual", "triton")]
    models[1].load_state_dict(models[0].state_dict())
    outs = [m(ids) for m in models]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for out in outs:
        out.square().mean().backward()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    assert copies == []


@pytest.mark.parametrize("name", list(_VARIANTS))
def test_count_params_equals_module(name):
    model = _model(**_VARIANTS[name])
    counts = M.count_params(model.config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_count_params_known_answers():
    # course TinyStories model: 2 * 10000 * 512 + 4 * (4 * 512^2 + 3 * 512 * 1344 + 2 * 512) + 512
    assert M.count_params(M.ModelConfig())["total"] == 22_696_448
    # GPT-2 XL shape from the course's accounting exercise
    assert M.count_params(M.ModelConfig.preset("gpt2-xl"))["total"] == 2_127_057_600
    # the benchmark shape: GPT-2 small, tied head, padded vocab, SwiGLU d_ff 2048
    tied = M.ModelConfig.preset("gpt2-small", vocab_size=50304, tie_weights=True, d_ff=2048)
    expected = 50304 * 768 + 12 * (4 * 768 ** 2 + 3 * 768 * 2048 + 2 * 768) + 768
    assert M.count_params(tied)["total"] == expected


def test_every_preset_is_valid_and_known_sizes():
    assert set(M.PRESETS) == {"tiny", "tinystories", "nanogpt", "gpt2-small", "gpt2-medium",
                              "gpt2-large", "gpt2-xl", "small", "medium", "large", "xl", "2.7B"}
    for name in M.PRESETS:
        config = M.ModelConfig.preset(name)
        assert config.d_model % config.num_heads == 0 and config.head_dim % 2 == 0, name
    assert M.ModelConfig.preset("tinystories") == M.ModelConfig()  # the defaults are the course's
    tiny = M.ModelConfig.preset("tiny", vocab_size=256)
    assert M.count_params(tiny)["total"] == sum(
        p.numel() for p in M.TransformerLM(tiny).parameters())
    total = {name: M.count_params(M.ModelConfig.preset(name))["total"] for name in M.PRESETS}
    # untied GPT-2 shapes, SwiGLU at d_ff = 4 d: 2 V d (embedding, head) + L (16 d^2 + 2 d) + d
    for name, layers, d in (("gpt2-small", 12, 768), ("gpt2-xl", 48, 1600)):
        assert total[name] == 2 * 50257 * d + layers * (16 * d * d + 2 * d) + d
    assert total["gpt2-xl"] == 2_127_057_600  # the README's figure
    # nanoGPT's benchmark shape: tied, vocab padded to 50304, d_ff 2048
    assert total["nanogpt"] == 50304 * 768 + 12 * (4 * 768**2 + 3 * 768 * 2048 + 2 * 768) + 768
    # the course's benchmark sizes: vocab 10,000, untied, SwiGLU with the table's d_ff
    assert total["2.7B"] == (2 * 10000 * 2560 + 32 * (4 * 2560**2 + 3 * 2560 * 10240 + 2 * 2560)
                             + 2560)
    with pytest.raises(ValueError, match="unknown preset"):
        M.ModelConfig.preset("gpt-2")


def test_flops_match_palm_formula_for_default():
    for config in (M.ModelConfig(), M.ModelConfig.preset("gpt2-small", tie_weights=True,
                                                         vocab_size=50304, d_ff=2048)):
        seq_len = config.context_length
        d, layers = config.d_model, config.num_layers
        n_matmul = layers * (4 * d * d + 3 * d * config.d_ff) + config.vocab_size * d
        flops = M.flops_per_token(config, seq_len)
        assert flops["train"] == 6 * n_matmul + 12 * layers * d * seq_len
        assert flops["train"] == 3 * flops["forward"]
        assert M.mfu_flops_per_token(config, seq_len) == flops["train"]
    xl = M.ModelConfig.preset("gpt2-xl")
    assert M.flops_per_token(xl, 1024)["forward"] * 1024 == pytest.approx(4.513e12, rel=1e-3)


def test_flops_variants():
    base = M.ModelConfig(**_TINY)
    window = M.ModelConfig(**_TINY, sliding_window=4)
    assert (M.flops_per_token(window, 32)["attention_scores"]
            == M.flops_per_token(base, 32)["attention_scores"] / 8)
    moe = M.ModelConfig(**_TINY, num_experts=8, experts_top_k=1)
    assert M.flops_per_token(moe, 32)["ffn"] == pytest.approx(
        M.flops_per_token(base, 32)["ffn"] + 2 * 2 * 32 * 8)
    assert M.flops_per_token(M.ModelConfig(**_TINY, mixer="hyena"), 32)["long_conv"] > 0


def test_hyena_flops_by_hand():
    """The tiny model (d=32, 2 layers, order 2, filter MLP width 64, vocab 64) at T=32."""
    flops = M.flops_per_token(M.ModelConfig(**_TINY, mixer="hyena"), 32)
    # mixer parameters: in_proj 32*3*32 + short filters 3*32*3 + filter MLP (17*64 + 64*64 +
    # 64*2*32) + skip 2*32 + output_proj 32*32 = 3072 + 288 + 9280 + 64 + 1024 = 13728
    assert flops["attention_proj"] == 2 * 2 * 13728
    # per channel: two FFTs of n=64 at 2.5 n log2 n, plus 6 per bin for 33 bins, over 32 tokens:
    # (2 * 2.5 * 64 * 6 + 6 * 33) / 32 = 2118 / 32; channels: 2 layers * order 2 * 32
    assert flops["long_conv"] == 2 * 2 * 32 * 2118 / 32 == 8472
    assert flops["attention_scores"] == flops["attention_values"] == 0
    assert flops["ffn"] == 2 * 2 * 3 * 32 * 64 and flops["lm_head"] == 2 * 32 * 64
    assert flops["forward"] == 54912 + 8472 + 24576 + 4096 == 92056
    assert flops["train"] == 3 * 92056


def test_memory_estimate():
    config = M.ModelConfig()
    memory = M.memory_estimate(config, batch_size=2, seq_len=256)
    n = M.count_params(config)["total"]
    assert memory["params"] == memory["grads"] == 4 * n and memory["adamw_state"] == 8 * n
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    bigger = M.memory_estimate(config, batch_size=4, seq_len=256)
    assert bigger["activations"] == 2 * memory["activations"]
    flash = M.memory_estimate(config, 2, 256, stores_attention_matrix=False)
    assert memory["activations"] - flash["activations"] == 4 * 4 * 2 * 16 * 2 * 256 * 256


def test_cli_prints_the_accounting(capsys):
    M.run_cli(M.main, [])
    printed = capsys.readouterr().out
    assert "22,696,448" in printed and "GiB" in printed and "seq_len=256" in printed
    M.run_cli(M.main, ["--preset=gpt2-small", "--num_layers=3", "--rope_theta=500",
                       "--tie_weights=False", "--num_kv_heads=4", "--sliding_window=8",
                       "--batch_size=2"])
    printed = capsys.readouterr().out  # typed from the defaults: 500 is a float, 8 an int
    for shown in ("num_layers=3,", "rope_theta=500.0,", "d_model=768,", "num_kv_heads=4,",
                  "sliding_window=8,", "batch 2 x 1024"):
        assert shown in printed
    M.run_cli(M.main, ["--preset=gpt2-xl", "--sliding_window=None", "--seq_len=512"])
    printed = capsys.readouterr().out
    assert "2,127,057,600" in printed and "sliding_window=None," in printed
    assert "seq_len=512" in printed


@pytest.mark.parametrize("argv,message", [
    (["--num_layer=3"], "unknown option --num_layer; did you mean --num_layers?"),
    (["--d_model=big"], "--d_model expects"),
    (["--num_heads=7"], "num_heads must divide d_model (512), got 7"),
    (["--num_kv_heads=5"], "num_kv_heads must divide num_heads (16), got 5"),
    (["--sliding_window=0"], "sliding_window must be an integer >= 1 or None, got 0"),
    (["--preset=gpt5"], "unknown preset 'gpt5'"),
    (["--batch_size=0"], "--batch_size"),
    (["--preset", "gpt2-xl"], "--key=value"),
])
def test_model_cli_errors_are_one_line(capsys, monkeypatch, argv, message):
    monkeypatch.delenv("CS336_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        M.run_cli(M.main, argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: ") and message in captured.err


def test_state_dict_reference_layout_and_errors():
    model = _model()
    expected = {"token_embeddings.weight", "ln_final.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attn.{p}.weight"
                     for p in ("q_proj", "k_proj", "v_proj", "output_proj")}
        expected |= {f"layers.{i}.ffn.{w}.weight" for w in ("w1", "w2", "w3")}
        expected |= {f"layers.{i}.ln1.weight", f"layers.{i}.ln2.weight"}
    state = model.state_dict()
    assert set(state) == expected
    other = _model(seed=3)
    other.load_state_dict(state)
    ids = _tokens((1, 8))
    torch.testing.assert_close(other(ids), model(ids))
    broken = dict(state)
    del broken["layers.1.ln2.weight"]
    broken["layers.1.extra.weight"] = torch.zeros(1)
    broken["lm_head.weight"] = torch.zeros(10, 32)
    with pytest.raises(ValueError) as error:
        other.load_state_dict(broken)
    for name in ("layers.1.ln2.weight", "layers.1.extra.weight", "lm_head.weight", "(10, 32)"):
        assert name in str(error.value)
    # keys saved from DDP around a compiled model (or the reverse) load too
    for prefix in ("module._orig_mod.", "_orig_mod.module."):
        other.load_state_dict({prefix + k: v for k, v in state.items()})


@pytest.mark.parametrize("overrides,field", [
    (dict(d_model=30, num_heads=4), "num_heads"),
    (dict(d_model=36, num_heads=4), "head dim"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(num_kv_heads=8), "num_kv_heads"),
    (dict(num_kv_heads=2, mixer="linear_attention"), "num_kv_heads"),
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(moe_aux_loss_coef=float("nan")), "moe_aux_loss_coef"),
    (dict(mla_rope_dim=4), "mla_rope_dim"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mixer="rnn"), "mixer"),
    (dict(attn_impl="cuda"), "attn_impl"),
    (dict(bias=True), "bias"),  # SwiGLU has no biases: count_params would count them
    (dict(num_layers=0), "num_layers"),
    (dict(d_model=32.0), "d_model"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(num_experts=2, experts_top_k=3), "experts_top_k"),
    (dict(kv_latent_dim=8, positions="learned"), "positions"),
    (dict(mixer="hyena", sliding_window=4), "sliding_window"),
    (dict(kv_latent_dim=8, sliding_window=4), "sliding_window"),
    (dict(kv_latent_dim=8, mla_rope_dim=3), "mla_rope_dim"),
    (dict(rope_theta=0.0), "rope_theta"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        M.ModelConfig(**{**_TINY, **overrides})


def test_bad_inputs():
    model = _model()
    with pytest.raises(ValueError, match="context_length"):
        model(_tokens((1, 33)))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[-1, 3]]))
    for dtype in (torch.float32, torch.uint8, torch.int16):  # uint8 would index as a mask
        with pytest.raises(ValueError, match="int64 or int32"):
            model(torch.zeros(1, 4, dtype=dtype))
    with pytest.raises(ValueError, match="positions"):
        model(_tokens((1, 4)), positions=torch.tensor([0, 1, 2, 40]))
    cache = model.make_kv_cache(1, max_seq_len=8)
    model(_tokens((1, 6)), kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache"):
        model(_tokens((1, 3)), kv_cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.make_kv_cache(1, max_seq_len=64)
    with pytest.raises(ValueError, match="prompt_ids"):
        M.generate(model, torch.zeros(3, dtype=torch.long), 2)


# =================================================================================================
# train.py: optimizers
# =================================================================================================

class _RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = _RMSNorm(d)
        self.ffn = nn.ModuleDict(dict(w1=nn.Linear(d, 2 * d), w2=nn.Linear(2 * d, d, bias=False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn["w2"](torch.relu(self.ffn["w1"](self.ln1(x))))


class _TinyLM(nn.Module):
    """Named like model.py's TransformerLM: token_embeddings, layers.i..., ln_final, lm_head."""

    def __init__(self, vocab_size: int = 32, d_model: int = 32, num_layers: int = 2,
                 tie: bool = False) -> None:
        super().__init__()
        self.token_embeddings = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(_Block(d_model) for _ in range(num_layers))
        self.ln_final = _RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie:
            self.lm_head.weight = self.token_embeddings.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embeddings(ids)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.ln_final(x))


def _tiny_batch(vocab_size: int = 32, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(vocab_size, (n,), generator=g)
    targets = torch.randint(vocab_size, (vocab_size,), generator=g)[ids]  # a fixed token map
    return ids, targets


def _loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(ids), targets)


def _make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adamw":
        return AdamW(decay_param_groups(model, 0.01), lr=1e-2)
    if name == "adamw_foreach":
        return AdamW(decay_param_groups(model, 0.01), lr=1e-2, foreach=True)
    if name == "muon":
        return Muon(param_groups_for_muon(model, lr=2e-2, adam_lr=1e-2, weight_decay=0.01))
    return SOAP(decay_param_groups(model, 0.01), lr=1e-2, precondition_frequency=2)


OPTIMIZERS = ["adamw", "adamw_foreach", "muon", "soap"]


def _two_group_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import
@pytest.mark.parametrize("path", ["loop", "foreach", "fused"])
def test_adamw_matches_torch_adamw(path: str) -> None:
    """150 steps, two groups with their own lr and weight decay, a cosine schedule changing lr
    every step, and one parameter whose grad is None every third step (so its step count lags
    and the fused path runs it in a bucket of its own)."""
    ours_model, torch_model = _two_group_mlp(), _two_group_mlp()

    def groups(m: nn.Sequential) -> list[dict]:
        return [dict(params=m[0].parameters(), lr=1e-2, weight_decay=0.1),
                dict(params=list(m[2].parameters()) + list(m[4].parameters()))]

    ours = AdamW(groups(ours_model), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01,
                 foreach=path == "foreach", fused=path == "fused")
    reference = torch.optim.AdamW(groups(torch_model), lr=3e-3, betas=(0.9, 0.95),
                                  weight_decay=0.01)
    base_lrs = [1e-2, 3e-3]
    gen = torch.Generator().manual_seed(1)
    steps = 150
    for t in range(steps):
        x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
        factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / steps))
        for model, opt in ((ours_model, ours), (torch_model, reference)):
            for group, base_lr in zip(opt.param_groups, base_lrs):
                group["lr"] = base_lr * factor
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if t % 3 == 0:
                model[4].bias.grad = None
            opt.step()
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    steps_ours = [ours.state[p]["step"] for p in ours_model.parameters()]
    steps_torch = [int(reference.state[p]["step"]) for p in torch_model.parameters()]
    assert steps_ours == steps_torch and steps_ours[-1] == steps - steps // 3


def test_adamw_foreach_equals_reference_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (2, 3, 4)]
    params = {k: [torch.randn(s, generator=gen) for s in shapes] for k in ("loop", "foreach")}
    params["foreach"] = [p.clone() for p in params["loop"]]
    moments = {k: ([torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes])
               for k in params}
    for t in range(1, 21):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        steps = [t, t, max(1, t - 3)]  # per-parameter step counts may differ
        for key, update in (("loop", adamw_update_reference), ("foreach", adamw_update_foreach)):
            update(params[key], grads, *moments[key], steps, lr=1e-2 / t, beta1=0.9, beta2=0.99,
                   eps=1e-8, weight_decay=0.1)
    for p, q in zip(params["loop"], params["foreach"]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import
def test_adamw_fused_compiles_once_for_all_steps() -> None:
    """The changing lr and bias corrections reach the compiled update as a tensor: after the
    first step no step compiles again (Python floats would be baked in, one compile per step)."""
    from torch._dynamo.utils import counters
    params = [nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))]
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
    for t in range(6):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.param_groups[0]["lr"] = 1e-2 / (t + 1)
        opt.step()
        if t == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(opt.state[p]["step"] == 6 for p in params)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import
def test_muon_and_soap_adamw_groups_take_the_fused_path() -> None:
    """fused=True gives the same steps: Muon's compiled update (a tall, a square and a wide
    matrix, with Nesterov and without) and its AdamW groups; SOAP's vectors."""
    for make in (lambda m, fused: Muon(param_groups_for_muon(m, lr=2e-2, weight_decay=0.01),
                                       fused=fused),
                 lambda m, fused: Muon(param_groups_for_muon(m, lr=2e-2, weight_decay=0.01),
                                       nesterov=False, fused=fused),
                 lambda m, fused: SOAP(decay_param_groups(m, 0.01), lr=1e-2, fused=fused)):
        models = [_two_group_mlp(), _two_group_mlp()]
        optimizers = [make(models[0], False), make(models[1], True)]
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
            for model, opt in zip(models, optimizers):
                opt.zero_grad()
                ((model(x) - y) ** 2).mean().backward()
                opt.step()
        for p, q in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import
def test_clip_and_step_scales_inside_the_update_as_clipping_would() -> None:
    """clip_and_step hands clipping's factor to our optimizers (step's grad_scale): the fused
    updates apply it as they read each gradient, leaving p.grad as backward wrote it (the pass
    saved); every optimizer and path takes the very step of clip_grad_norm, then step(). A
    wrapper with its own clip_grad_norm (ddp.py's) clips as before."""
    makes = {"adamw": lambda m: AdamW(decay_param_groups(m, 0.01), lr=1e-2),
             "adamw foreach": lambda m: AdamW(decay_param_groups(m, 0.01), lr=1e-2, foreach=True),
             "adamw fused": lambda m: AdamW(decay_param_groups(m, 0.01), lr=1e-2, fused=True),
             "muon": lambda m: Muon(param_groups_for_muon(m, lr=2e-2, weight_decay=0.01)),
             "muon fused": lambda m: Muon(param_groups_for_muon(m, lr=2e-2, weight_decay=0.01),
                                          fused=True),
             "soap": lambda m: SOAP(decay_param_groups(m, 0.01), lr=1e-2)}
    for name, make in makes.items():
        models = [_two_group_mlp(), _two_group_mlp()]
        reference, ours = (make(m) for m in models)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            x, y = torch.randn(16, 8, generator=gen), 100 * torch.randn(16, 4, generator=gen)
            for model in models:
                model.zero_grad()
                ((model(x) - y) ** 2).mean().backward()
            written = [p.grad.clone() for p in models[1].parameters()]
            expected = train.clip_grad_norm(models[0].parameters(), 0.1)
            reference.step()
            norm = train.clip_and_step(models[1], ours, list(models[1].parameters()), 0.1)
            assert norm.item() == pytest.approx(expected.item(), rel=1e-6) and norm > 1, name
            if "fused" in name:
                assert all(torch.equal(p.grad, g) for p, g in zip(models[1].parameters(), written))
        for p, q in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    wrapper, reference, calls = _two_group_mlp(), _two_group_mlp(), []

    def wrapper_clip(params, max_norm):  # as ddp.py's: in place, after its own averaging
        calls.append(max_norm)
        return train.clip_grad_norm(params, max_norm)
    wrapper.clip_grad_norm = wrapper_clip
    optimizers = [AdamW(m.parameters(), lr=0.1) for m in (wrapper, reference)]
    real_step, optimizers[0].step = optimizers[0].step, (  # records what the step is given
        lambda **kwargs: calls.append(kwargs) or real_step(**kwargs))
    for m in (wrapper, reference):
        ((m(torch.randn(2, 8, generator=torch.Generator().manual_seed(1))) - 9) ** 2).mean(
            ).backward()
    train.clip_and_step(wrapper, optimizers[0], list(wrapper.parameters()), 0.1)
    train.clip_grad_norm(reference.parameters(), 0.1)
    optimizers[1].step()
    assert calls == [0.1, {}]  # the wrapper clipped; the step got no factor to apply again
    for p, q in zip(wrapper.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_optimizer_load_keeps_runtime_choices() -> None:
    """foreach/fused say how to compute a step, not which step: a checkpoint of a fused (GPU) run
    loads into a loop (CPU) optimizer as a loop optimizer, and a state_dict saved before the
    fused option existed still loads."""
    param = nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    fused = AdamW([param], lr=0.1, fused=True, foreach=True)
    state = fused.state_dict()
    plain = AdamW([param], lr=0.5)
    plain.load_state_dict(state)
    group = plain.param_groups[0]
    assert group["lr"] == 0.1 and group["fused"] is False and group["foreach"] is None
    del state["param_groups"][0]["fused"]
    plain.load_state_dict(state)
    plain.step()  # runs the loop path
    with pytest.raises(ValueError, match="fused"):
        AdamW([param], fused="yes")


def test_adamw_rejects_sparse_grads_and_skips_missing_grads() -> None:
    embedding = nn.Embedding(10, 4, sparse=True)
    unused = nn.Parameter(torch.ones(3))
    opt = AdamW([embedding.weight, unused])
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    embedding.weight.grad = None
    opt.step()  # no gradients at all: nothing happens
    assert torch.equal(unused, torch.ones(3)) and len(opt.state) == 0


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (96, 96), (300, 40)])
def test_newtonschulz_singular_values_near_one(shape: tuple[int, int]) -> None:
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    X = zeropower_via_newtonschulz(G)
    assert X.shape == G.shape and X.dtype == G.dtype
    if shape[0] != shape[1]:  # random rectangular matrices are well conditioned
        singular_values = torch.linalg.svdvals(X)
        assert singular_values.min() > 0.6 and singular_values.max() < 1.3
    # A square random matrix has singular values near 0, which 5 steps cannot lift: check the
    # map singular value by singular value through G's own SVD. This also checks that the
    # singular vectors are kept (U^T X V is diagonal).
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.T @ X @ Vh.T
    diagonal = D.diagonal()
    assert (D - torch.diag(diagonal)).abs().max() < 1e-3
    lifted = diagonal[S / G.norm() > 2e-3]
    assert len(lifted) >= len(S) - 2
    assert lifted.min() > 0.6 and lifted.max() < 1.3


def test_newtonschulz_square_matrix_with_bounded_condition() -> None:
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    G = U @ torch.diag(torch.logspace(-2, 0, 64)) @ V.T  # condition number 100
    singular_values = torch.linalg.svdvals(zeropower_via_newtonschulz(G))
    assert singular_values.min() > 0.6 and singular_values.max() < 1.3


def test_newtonschulz_zero_matrix_stays_zero() -> None:
    assert torch.equal(zeropower_via_newtonschulz(torch.zeros(4, 6)), torch.zeros(4, 6))


def test_newtonschulz_gram_equals_the_plain_iteration_and_needs_its_restart(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    m, n = 128, 384  # wide enough for the Gram path; a power-law spectrum, like a gradient's
    U = torch.linalg.qr(torch.randn(2, m, m, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(2, n, m, generator=gen, dtype=torch.float64))[0]
    G = (U * torch.arange(1, m + 1, dtype=torch.float64) ** -1.0) @ V.mT
    X = G / G.norm(dim=(-2, -1), keepdim=True)

    def plain_iteration(X: torch.Tensor, steps: int = 5) -> torch.Tensor:
        for _ in range(steps):
            X = _newtonschulz_polynomial(X @ X.mT) @ X
        return X

    def error(out: torch.Tensor, steps: int = 5) -> float:
        exact = plain_iteration(X, steps)
        return float((out.double() - exact).norm() / exact.norm())
    # the same algebra: equal in float64; zeropower_via_newtonschulz takes this path when
    # n >= 2.5 m, for wide and (transposed) tall matrices, in float32 on a CPU
    plain = plain_iteration(X)
    torch.testing.assert_close(newtonschulz_gram(X), plain, rtol=0, atol=1e-12)
    calls = []
    monkeypatch.setattr(train, "newtonschulz_gram", lambda X, steps: calls.append(
        (tuple(X.shape), X.dtype)) or newtonschulz_gram(X, steps))
    torch.testing.assert_close(zeropower_via_newtonschulz(G).double(), plain, rtol=0, atol=1e-5)
    tall = zeropower_via_newtonschulz(G.mT.float())
    torch.testing.assert_close(tall.double(), plain.mT, rtol=0, atol=1e-5)
    zeropower_via_newtonschulz(torch.ones(40, 99))  # under 2.5x as wide: the plain iteration
    zeropower_via_newtonschulz(torch.ones(40, 100).half())  # normalised in float32 first
    assert calls == [((2, m, n), torch.float32)] * 2 + [((1, 40, 100), torch.float32)]
    huge = torch.randn(16, 64, generator=gen).half() * 3000  # norm over float16's 65504
    torch.testing.assert_close(zeropower_via_newtonschulz(huge).float(),
                               zeropower_via_newtonschulz(huge.float()), rtol=0, atol=2e-3)
    # In float16 the restart keeps it near float64; never restarting, R's rounding swamps the
    # small singular values (squared in R) and the result drifts far off. With more steps, a
    # restart every 3 keeps it as precise as the plain iteration in float16.
    assert error(newtonschulz_gram(X.half())) < 0.01
    assert error(newtonschulz_gram(X.half(), restart=99)) > 0.05
    for steps in (12, 20):
        half_error = error(plain_iteration(X.half(), steps), steps)
        assert error(newtonschulz_gram(X.half(), steps), steps) < 1.5 * half_error
        assert error(newtonschulz_gram(X.float(), steps), steps) < 1e-4
        zero = torch.zeros(1, 8, 24, dtype=torch.float16)  # Q ~ 3.44^steps if never folded
        assert torch.equal(newtonschulz_gram(zero, steps), zero)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_update_is_scaled_near_orthogonal(nesterov: bool) -> None:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(48, 16))
    before = weight.detach().clone()
    lr = 0.01
    opt = Muon([weight], lr=lr, weight_decay=0.0, nesterov=nesterov)
    weight.grad = torch.randn(48, 16)
    opt.step()
    update = (before - weight.detach()) / (lr * 0.2 * 48**0.5)
    singular_values = torch.linalg.svdvals(update)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.3
    # the direction is the gradient's polar factor U V^T (an SVD, independent of Newton-Schulz)
    U, _, Vh = torch.linalg.svd(weight.grad, full_matrices=False)
    cosine = (update * (U @ Vh)).sum() / (update.norm() * (U @ Vh).norm())
    assert cosine > 0.95
    # the RMS of the step is 0.2 * lr, as for a typical AdamW step (Moonshot's scaling)
    rms = (before - weight.detach()).pow(2).mean().sqrt()
    assert 0.6 * 0.2 * lr < rms < 1.3 * 0.2 * lr
    assert torch.equal(weight.grad, weight.grad.clone())  # the gradient is not modified
    assert "momentum_buffer" in opt.state[weight]


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_momentum_and_weight_decay_follow_the_formulas(nesterov: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    start, g1, g2 = (torch.randn(6, 10, generator=gen) for _ in range(3))
    weight = nn.Parameter(start.clone())
    lr, mu, wd = 0.01, 0.9, 0.1
    opt = Muon([weight], lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd)
    expected, buf = start.clone(), torch.zeros(6, 10)
    for g in (g1, g2):
        weight.grad = g
        opt.step()
        buf = mu * buf + (1 - mu) * g
        u = (1 - mu) * g + mu * buf if nesterov else buf
        expected = expected * (1 - lr * wd) - lr * 0.2 * 10**0.5 * zeropower_via_newtonschulz(u)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)


def test_muon_flattens_tensors_with_more_than_two_dims() -> None:
    weight = nn.Parameter(torch.randn(8, 2, 3))  # a convolution-like weight: (8, 6) when flat
    before = weight.detach().clone()
    opt = Muon([weight], lr=0.01, weight_decay=0.0)
    weight.grad = torch.randn(8, 2, 3)
    opt.step()
    update = (before - weight.detach()).reshape(8, 6) / (0.01 * 0.2 * 8**0.5)
    singular_values = torch.linalg.svdvals(update)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.3


def test_param_groups_for_muon_split() -> None:
    model = _TinyLM()
    groups = param_groups_for_muon(model, lr=0.02, adam_lr=0.003, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {(g["use_muon"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"])
               for g in groups}
    assert by_kind == {
        (True, 0.1): [f"layers.{i}.ffn.{w}.weight" for i in range(2) for w in ("w1", "w2")],
        (False, 0.1): ["lm_head.weight"],
        (False, 0.0): sorted(["token_embeddings.weight", "ln_final.weight"]
                             + [f"layers.{i}.{n}" for i in range(2)
                                for n in ("ln1.weight", "ffn.w1.bias")]),
    }
    assert [g["lr"] for g in groups] == [0.02, 0.003, 0.003]
    tied = _TinyLM(tie=True)
    tied_groups = param_groups_for_muon(tied, lr=0.02)
    assert sum(len(g["params"]) for g in tied_groups) == len(list(tied.parameters()))
    assert all(g["lr"] == 0.02 for g in tied_groups)


def test_decay_param_groups_split() -> None:
    model = _TinyLM(tie=True)
    decay, no_decay = decay_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        f"layers.{i}.ffn.{w}.weight" for i in range(2) for w in ("w1", "w2"))
    assert "token_embeddings.weight" in {names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _regression(make_optimizer, output_rotation: torch.Tensor | None = None, steps: int = 300,
                outputs: int = 8) -> tuple[list[float], torch.Tensor]:
    """Noisy linear regression y = W* x + noise, x with a rotated, ill-conditioned covariance:
    a quadratic whose curvature Adam's per-coordinate scaling cannot undo. Returns the
    population loss tr(E Sigma E^T), E = W - W*, before each step, and the final W."""
    gen = torch.Generator().manual_seed(0)
    m, n, batch, condition = outputs, 16, 16, 1000.0
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    # x = mix @ z, z ~ N(0, I), has covariance mix mix^T = Q diag(std devs^2) Q^T
    mix = Q * torch.logspace(0, math.log10(condition) / 2, n)
    sigma = mix @ mix.T
    W_star = torch.randn(m, n, generator=gen) @ Q.T
    P = torch.eye(m) if output_rotation is None else output_rotation
    W = nn.Parameter(torch.zeros(m, n))
    opt = make_optimizer([W])
    losses = []
    for _ in range(steps):
        error = P.T @ W.detach() - W_star
        losses.append(torch.trace(error @ sigma @ error.T).item())
        x = torch.randn(batch, n, generator=gen) @ mix.T
        y = (x @ W_star.T + torch.randn(batch, m, generator=gen)) @ P.T
        opt.zero_grad()
        ((x @ W.T - y) ** 2).sum(-1).mean().backward()
        opt.step()
    return losses, W.detach()


def test_soap_beats_adam_on_rotated_quadratic() -> None:
    def final(losses: list[float]) -> float:
        return sum(losses[-20:]) / 20

    lrs = (0.01, 0.03, 0.1, 0.3)  # each optimizer at its best learning rate
    adam = min(final(_regression(lambda p: AdamW(p, lr=lr, betas=(0.9, 0.95),
                                                 weight_decay=0.0))[0]) for lr in lrs)
    soap = min(final(_regression(lambda p: SOAP(p, lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
                                                precondition_frequency=1))[0]) for lr in lrs)
    initial = _regression(lambda p: AdamW(p), steps=1)[0][0]
    assert soap < initial / 1000, "SOAP did not reach the target"
    assert soap < adam / 2, (soap, adam)


def test_soap_is_rotation_equivariant_and_adam_is_not() -> None:
    """Rotating the outputs (W -> P W, y -> P y) leaves the problem the same, and SOAP's run with
    it (its left eigenbasis turns with P): the same losses up to float32 rounding, which the
    eigendecomposition of an ill-conditioned statistic amplifies. Adam's coordinates are fixed,
    so its run changes."""
    # 16 outputs, so that L and R both have full rank from the first batch: the eigenvectors of a
    # zero eigenvalue are arbitrary, and the rotated run would pick others.
    P, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))

    def max_relative_change(make_optimizer) -> float:
        losses, _ = _regression(make_optimizer, steps=60, outputs=16)
        rotated_losses, _ = _regression(make_optimizer, output_rotation=P, steps=60, outputs=16)
        return max(abs(a - b) / a for a, b in zip(losses, rotated_losses))

    assert max_relative_change(lambda p: SOAP(p, lr=0.03, precondition_frequency=3)) < 1e-3
    assert max_relative_change(lambda p: AdamW(p, lr=0.03)) > 3e-2


def test_soap_equals_adamw_without_preconditioning() -> None:
    """With both sides above max_precond_dim the bases stay the identity: SOAP is AdamW."""
    ours_model, torch_model = _two_group_mlp(), _two_group_mlp()
    ours = SOAP(ours_model.parameters(), lr=1e-2, weight_decay=0.1, max_precond_dim=0)
    reference = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, betas=(0.95, 0.95),
                                  weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
        for model, opt in ((ours_model, ours), (torch_model, reference)):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_soap_equals_adamw_when_gradients_are_diagonal() -> None:
    """Diagonal gradients make L and R diagonal, so the eigenbases are signed permutations of the
    identity, reordered whenever the gradient sizes change order; Adam in a permuted basis is
    Adam, provided the second moment is permuted along (_rotate_second_moment). SOAP's first
    gradient only seeds the bases, so AdamW sees the same gradients from the second on."""
    gen = torch.Generator().manual_seed(0)
    gradients = [torch.diag(torch.randn(6, generator=gen) * torch.rand(6, generator=gen) * 3)
                 for _ in range(31)]
    start = torch.randn(6, 6, generator=gen)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    soap = SOAP([ours], lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, precondition_frequency=1)
    adamw = torch.optim.AdamW([theirs], lr=0.05, betas=(0.9, 0.99), weight_decay=0.1)
    ours.grad = gradients[0]
    soap.step()
    for g in gradients[1:]:
        ours.grad, theirs.grad = g.clone(), g.clone()
        soap.step()
        adamw.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_soap_first_gradient_only_seeds_the_eigenbases() -> None:
    weight = nn.Parameter(torch.randn(12, 7))
    before = weight.detach().clone()
    opt = SOAP([weight])
    weight.grad = torch.randn(12, 7)
    opt.step()
    assert torch.equal(weight.detach(), before)
    state = opt.state[weight]
    # Q_L, Q_R are eigenvectors of L, R: the statistics are diagonal in them
    for Q, statistic in ((state["Q_L"], state["L"]), (state["Q_R"], state["R"])):
        rotated = Q.T @ statistic @ Q
        off_diagonal = rotated - torch.diag(rotated.diagonal())
        assert off_diagonal.abs().max() < 1e-4 * statistic.abs().max()
    opt.step()
    assert not torch.equal(weight.detach(), before) and state["step"] == 1


def test_power_iteration_converges_to_the_eigenbasis() -> None:
    gen = torch.Generator().manual_seed(0)
    Q_true, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen))
    eigenvalues = torch.linspace(1.0, 10.0, 10)
    statistic = Q_true @ torch.diag(eigenvalues) @ Q_true.T
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen))
    for _ in range(300):
        Q = _power_iteration(statistic, Q)
    torch.testing.assert_close((Q.T @ statistic @ Q).diagonal(), eigenvalues.flip(0),
                               rtol=1e-4, atol=1e-4)


def test_second_moment_rotation_is_exact_for_permutations_and_sign_flips() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(4, 3, generator=gen)
    rows, cols = torch.tensor([2, 0, 3, 1]), torch.tensor([1, 2, 0])
    left = torch.eye(4)[rows] * torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]
    right = torch.eye(3)[cols]
    # the variances of X_new = left X right^T are v's entries, moved with the coordinates
    assert torch.equal(_rotate_second_moment(v, left, right), v[rows][:, cols])
    assert torch.equal(_rotate_second_moment(v, None, None), v)


def test_soap_identity_side_above_max_precond_dim() -> None:
    weight = nn.Parameter(torch.randn(40, 6))
    opt = SOAP([weight], max_precond_dim=10)
    weight.grad = torch.randn(40, 6)
    opt.step()
    state = opt.state[weight]
    assert state["L"] is None and state["Q_L"] is None and state["Q_R"].shape == (6, 6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tiny_model_overfits_a_tiny_batch(name: str) -> None:
    torch.manual_seed(0)
    model = _TinyLM()
    opt = _make_optimizer(name, model)
    ids, targets = _tiny_batch()
    initial = _loss(model, ids, targets).item()
    for _ in range(150):
        opt.zero_grad()
        _loss(model, ids, targets).backward()
        opt.step()
    final = _loss(model, ids, targets).item()
    assert final < initial / 20, (name, initial, final)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_resume_is_bit_identical(name: str) -> None:
    ids, targets = _tiny_batch()

    def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        for t in steps:
            for group in opt.param_groups:  # a schedule: the lr changes every step
                group["lr"] = 1e-2 / (1 + t)
            opt.zero_grad()
            _loss(model, ids, targets).backward()
            opt.step()

    torch.manual_seed(0)
    model = _TinyLM()
    opt = _make_optimizer(name, model)
    train(model, opt, range(5))
    checkpoint = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint)
    train(model, opt, range(5, 10))

    checkpoint.seek(0)
    saved = torch.load(checkpoint)
    resumed_model = _TinyLM()
    resumed_model.load_state_dict(saved["model"])
    resumed_opt = _make_optimizer(name, resumed_model)
    resumed_opt.load_state_dict(saved["optimizer"])
    train(resumed_model, resumed_opt, range(5, 10))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_soap_keeps_float32_statistics_for_bfloat16_params_on_resume() -> None:
    weight = nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    opt = SOAP([weight])
    weight.grad = torch.randn(8, 4, dtype=torch.bfloat16)
    opt.step()
    resumed = SOAP([weight])
    resumed.load_state_dict(opt.state_dict())
    assert resumed.state[weight]["Q_L"].dtype == torch.float32
    assert torch.equal(resumed.state[weight]["Q_L"], opt.state[weight]["Q_L"])


@pytest.mark.parametrize("cls, kwargs, field", [
    (AdamW, dict(lr=-1.0), "lr"),
    (AdamW, dict(lr=float("nan")), "lr"),
    (AdamW, dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (AdamW, dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (AdamW, dict(betas=(0.9,)), "betas"),
    (AdamW, dict(eps=-1e-8), "eps"),
    (AdamW, dict(weight_decay=-0.1), "weight_decay"),
    (Muon, dict(momentum=1.0), "momentum"),
    (Muon, dict(ns_steps=0), "ns_steps"),
    (Muon, dict(lr="0.02"), "lr"),
    (SOAP, dict(precondition_frequency=0), "precondition_frequency"),
    (SOAP, dict(max_precond_dim=-1), "max_precond_dim"),
    (SOAP, dict(shampoo_beta=1.5), "shampoo_beta"),
])
def test_bad_hyperparameters_name_the_field(cls: type, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        cls([nn.Parameter(torch.ones(2, 2))], **kwargs)


def test_bad_group_values_and_muon_vectors_are_rejected() -> None:
    with pytest.raises(ValueError, match="weight_decay"):
        AdamW([dict(params=[nn.Parameter(torch.ones(2))], weight_decay=-1.0)])
    opt = AdamW([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group(dict(params=[nn.Parameter(torch.ones(2))], lr=-1.0))
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="param_groups_for_muon"):
        Muon([nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match="complex"):
        AdamW([nn.Parameter(torch.ones(3, dtype=torch.complex64))])


# =================================================================================================
# train.py
# =================================================================================================

_TINY_MODEL = dict(context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=64)


def _cfg(cache_dir: Path, out_dir: Path, **overrides) -> train.TrainConfig:
    cfg = train.TrainConfig(dataset="pydoc", cache_dir=str(cache_dir), out_dir=str(out_dir),
                            max_text_mb=0.1, vocab_size=300, batch_size=4, max_iters=6,
                            warmup_iters=2, eval_interval=3, eval_iters=2, log_interval=1,
                            checkpoint_interval=0, num_samples=1, sample_tokens=8, device="cpu")
    cfg.model = dict(_TINY_MODEL)
    return train.with_overrides(cfg, overrides)


@pytest.fixture(scope="module")
def _cache(tmp_path_factory) -> Path:
    """Tokenizer and .bin files for the pydoc corpus, built once for the whole module."""
    cache = tmp_path_factory.mktemp("cache")
    train.prepare_data(_cfg(cache, cache / "unused"))
    return cache


def _rows(path: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["iter"]: r[key] for r in rows if key in r}


_LOSSES = pytest.mark.parametrize("loss_fn", ["cross_entropy", "fused_cross_entropy"])


@_LOSSES
def test_cross_entropy_matches_torch_including_huge_logits_and_ignore_index(loss_fn):
    cross_entropy = getattr(train, loss_fn)
    torch.manual_seed(0)
    for scale in (1.0, 1e4):  # 1e4: exp would overflow without subtracting the max
        logits = torch.randn(3, 5, 11, dtype=torch.float64) * scale
        targets = torch.randint(11, (3, 5))
        targets[0, :2] = -100
        expected = F.cross_entropy(logits.view(-1, 11), targets.view(-1), ignore_index=-100)
        got = cross_entropy(logits.float(), targets)
        assert torch.isfinite(got)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4 * scale)
    # any leading dims, including none; a custom ignore index
    logits, targets = torch.randn(7, 13), torch.randint(13, (7,))
    targets[3] = 5
    torch.testing.assert_close(cross_entropy(logits, targets, ignore_index=5),
                               F.cross_entropy(logits, targets, ignore_index=5))
    # bf16 logits are scored in float32
    logits = torch.randn(2, 4, 9).bfloat16()
    targets = torch.randint(9, (2, 4))
    torch.testing.assert_close(cross_entropy(logits, targets),
                               F.cross_entropy(logits.float().view(-1, 9), targets.view(-1)))
    # every target ignored: zero, not NaN
    assert cross_entropy(torch.randn(2, 3), torch.full((2,), -100)).item() == 0.0


@_LOSSES
def test_cross_entropy_gradient_matches_torch(loss_fn):
    torch.manual_seed(1)
    a = (torch.randn(4, 6, 10) * 30).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    targets = torch.randint(10, (4, 6))
    targets[1, 2:] = -100
    (getattr(train, loss_fn)(a, targets) * 3.0).backward()  # a non-unit upstream gradient
    (F.cross_entropy(b.view(-1, 10), targets.view(-1)) * 3.0).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_fused_cross_entropy_compiles_and_keeps_the_logits_dtype():
    torch.manual_seed(2)
    logits = torch.randn(3, 8, 17).bfloat16().requires_grad_(True)
    targets = torch.randint(17, (3, 8))
    compiled = torch.compile(train.fused_cross_entropy, fullgraph=True, backend="aot_eager")
    loss = compiled(logits, targets)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16
    reference = logits.detach().float().requires_grad_(True)
    expected = F.cross_entropy(reference.view(-1, 17), targets.view(-1))
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits.grad.float(), reference.grad, atol=2e-3, rtol=2e-2)


def test_perplexity_and_unigram_entropy():
    assert train.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert train.perplexity(1e6) == math.inf
    # four equally frequent tokens: log 4 nats; a single token: 0
    assert train.unigram_entropy(np.array([0, 1, 2, 3] * 5), 10) == pytest.approx(math.log(4))
    assert train.unigram_entropy(np.zeros(9, dtype=np.uint16), 4) == 0.0


def test_lr_cosine_known_values_and_boundaries():
    # The course's reference schedule: lr_max 1, lr_min 0.1, warm-up 7, cycle 21.
    expected = [0, 1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 1.0, 0.9887175604818206,
                0.9554359905560885, 0.9018241671106134, 0.8305704108364301, 0.7452476826029011,
                0.6501344202803414, 0.55, 0.44986557971965857, 0.3547523173970989,
                0.26942958916356996, 0.19817583288938662, 0.14456400944391146,
                0.11128243951817937, 0.1, 0.1, 0.1, 0.1]
    got = [train.lr_cosine(t, 1.0, 0.1, 7, 21) for t in range(25)]
    assert got == pytest.approx(expected)
    assert train.lr_cosine(0, 3.0, 0.3, 0, 0) == 3.0  # no warm-up, no cycle: no division by 0


def test_lr_wsd_boundaries():
    lr = [train.lr_wsd(t, 1.0, 0.1, 4, 20, 5) for t in range(22)]
    assert lr[0] == 0 and lr[2] == 0.5 and lr[4] == 1.0
    assert lr[4:15] == [1.0] * 11  # stable until the decay starts at 20 - 5
    assert lr[15] == 1.0 and lr[17] == pytest.approx(1.0 - 2 / 5 * 0.9)
    assert lr[20] == lr[21] == 0.1
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(2)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    for max_norm in (0.5, 1e3):  # clipped, untouched
        ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        ours.append(torch.nn.Parameter(torch.randn(3)))  # no gradient: ignored
        norm = train.clip_grad_norm(ours, max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        torch.testing.assert_close(norm, ref_norm)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.grad, q.grad)
        if max_norm < 1:
            total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours[:3]]))
            assert total.item() == pytest.approx(max_norm, rel=1e-5)


def test_get_batch_windows_are_consecutive_slices(tmp_path):
    path = tmp_path / "tokens.bin"
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 60000, size=500, dtype=np.uint16)
    tokens.tofile(path)
    memmap = np.memmap(path, dtype=np.uint16, mode="r")
    gen = torch.Generator().manual_seed(3)
    x, y = train.get_batch(memmap, 8, 16, "cpu", gen)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    starts = set()
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        # brute force: the window must occur in the array with its target one token later
        hits = [s for s in range(len(tokens) - 16) if (tokens[s:s + 16] == row_x).all()]
        assert hits and any((tokens[s + 1:s + 17] == row_y).all() for s in hits)
        starts.update(hits)
    assert len(starts) > 1  # random windows, not one window repeated
    x2, _ = train.get_batch(memmap, 8, 16, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(x, x2)  # the generator fixes the batch
    with pytest.raises(ValueError, match="context_length"):
        train.get_batch(memmap[:16], 2, 16, "cpu")


def test_load_tokens_rejects_mismatched_truncated_and_missing_files(_cache, tmp_path):
    tok_dir, train_bin, _ = train.prepare_data(_cfg(_cache, tmp_path))
    tok = Tokenizer.from_dir(tok_dir)
    tokens = train.load_tokens(train_bin, tok)
    assert tokens.dtype == np.uint16 and tokens.max() < tok.vocab_size
    meta = json.loads(Path(train_bin + ".json").read_text())
    for key, bad in (("vocab_size", 50257), ("dtype", "uint32"), ("tokenizer", "0123abcd")):
        bad_bin = tmp_path / f"bad_{key}.bin"
        bad_bin.write_bytes(Path(train_bin).read_bytes())
        Path(str(bad_bin) + ".json").write_text(json.dumps({**meta, key: bad}))
        with pytest.raises(ValueError, match=key):
            train.load_tokens(bad_bin, tok)
    short = tmp_path / "short.bin"
    short.write_bytes(Path(train_bin).read_bytes()[:-2])
    Path(str(short) + ".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="truncated"):
        train.load_tokens(short, tok)
    with pytest.raises(FileNotFoundError):
        train.load_tokens(tmp_path / "missing.bin", tok)
    with pytest.raises(FileNotFoundError, match="no_such.txt"):
        train.prepare_data(_cfg(_cache, tmp_path, data=str(tmp_path / "no_such.txt")))


def test_stale_cached_bin_is_re_encoded_not_reused(_cache, tmp_path, capsys):
    cfg = _cfg(tmp_path / "cache", tmp_path)
    _, train_bin, _ = train.prepare_data(cfg)
    meta_path = Path(train_bin + ".json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "tokenizer": "stale"}))
    train.prepare_data(cfg)
    assert "re-encoding" in capsys.readouterr().out
    assert json.loads(meta_path.read_text()) == meta


class _FakeResponse(io.BytesIO):
    def __init__(self, body: bytes, status: int, fail_after: int | None = None):
        super().__init__(body)
        self.status, self.fail_after = status, fail_after
        self.headers = {"Content-Length": str(len(body))}

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection dropped (test)")
        return super().read(n if self.fail_after is None else min(n, self.fail_after))


def test_download_resumes_with_range_and_checks_length(tmp_path, monkeypatch):
    body = bytes(range(256)) * 10_000
    requests = []

    def urlopen(request, timeout):
        requests.append(request.get_header("Range"))
        start = int(request.get_header("Range")[6:-1]) if request.get_header("Range") else 0
        fail = 100_000 if len(requests) == 1 else None  # the first attempt is cut off
        return _FakeResponse(body[start:], 206 if start else 200, fail)

    monkeypatch.setattr(train.urllib.request, "urlopen", urlopen)
    dest = tmp_path / "corpus.txt"
    with pytest.raises(ConnectionResetError):
        train.download("https://example.invalid/corpus.txt", dest)
    assert not dest.exists() and (tmp_path / "corpus.txt.part").stat().st_size == 100_000
    train.download("https://example.invalid/corpus.txt", dest)
    assert requests == [None, "bytes=100000-"]
    assert dest.read_bytes() == body and not (tmp_path / "corpus.txt.part").exists()

    # A body shorter than Content-Length promises: an error, and no file under the real name.
    def short(request, timeout):
        response = _FakeResponse(body[:1000], 200)
        response.headers = {"Content-Length": "5000"}
        return response

    monkeypatch.setattr(train.urllib.request, "urlopen", short)
    with pytest.raises(OSError, match="1000 of 5000"):
        train.download("https://example.invalid/other.txt", tmp_path / "other.txt")
    assert not (tmp_path / "other.txt").exists()


def test_overrides_are_typed_from_defaults_and_unknown_keys_suggest():
    cfg = train.parse_config(["--lr=1", "--compile=False", "--max_iters=1e3", "--tie_weights=True",
                              "--sliding_window=8", "--d_model=64", "--data=notes.txt",
                              "--resume"], train.TrainConfig())
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.compile is False and cfg.max_iters == 1000 and cfg.resume is True
    assert cfg.data == "notes.txt"
    assert cfg.model == {"tie_weights": True, "sliding_window": 8, "d_model": 64}
    model = train.build_model_config(cfg, 100)
    assert model.d_model == 64 and model.num_layers == M.PRESETS["tiny"]["num_layers"]
    assert model.vocab_size == 100  # the model's vocabulary is the tokenizer's
    assert train.TrainConfig().model == {}  # defaults are not shared and mutated
    nanogpt = train.build_model_config(train.parse_config(["--preset=nanogpt"],
                                                          train.TrainConfig()), 300)
    assert nanogpt.d_model == 768 and nanogpt.num_layers == 12 and nanogpt.vocab_size == 300
    with pytest.raises(ValueError, match="--max_iters"):
        train.parse_config(["--max_iter=5"], train.TrainConfig())
    with pytest.raises(ValueError, match="--d_model"):
        train.parse_config(["--d_modle=5"], train.TrainConfig())
    with pytest.raises(ValueError, match="--learning_rate; valid keys: .*, lr, "):
        train.parse_config(["--learning_rate=5"], train.TrainConfig())  # far off: list them all
    with pytest.raises(ValueError, match="batch_size"):
        train.parse_config(["--batch_size=big"], train.TrainConfig())
    with pytest.raises(ValueError, match="resume"):
        train.parse_config(["--resume=maybe"], train.TrainConfig())


def test_config_files_json_and_literal_lines(tmp_path):
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"lr": 3, "optimizer": "muon", "num_layers": 2}))
    py = tmp_path / "run.cfg"
    py.write_text("# a comment\nbatch_size = 8  # per process\nsample_prompt = 'a # b'\n"
                  "compile = False\n")
    cfg = train.parse_config([str(js), str(py), "--lr=5e-4"], train.TrainConfig())
    assert cfg.lr == 5e-4 and cfg.optimizer == "muon" and cfg.model["num_layers"] == 2
    assert cfg.batch_size == 8 and cfg.sample_prompt == "a # b" and cfg.compile is False
    bad = tmp_path / "bad.cfg"
    bad.write_text("lr = __import__('os').getcwd()\n")  # literals only: nothing runs
    with pytest.raises(ValueError, match="literal"):
        train.parse_config([str(bad)], train.TrainConfig())
    # the config a checkpoint saves (and --help prints), model dict included, loads back
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(dataclasses.asdict(train.TrainConfig(lr=0.5))))
    cfg = train.parse_config([str(saved)], train.TrainConfig())
    assert cfg.lr == 0.5 and cfg.model == train.TrainConfig().model
    cfg = train.parse_config([str(saved), "--resume", str(js)], train.TrainConfig())
    assert cfg.resume is True and cfg.lr == 3.0  # a bool flag never swallows the next file
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"warmup": 3}))
    with pytest.raises(ValueError, match="warmup_iters"):
        train.parse_config([str(typo)], train.TrainConfig())
    with pytest.raises(train.UsageError, match="does not exist"):
        train.parse_config([str(tmp_path / "none.json")], train.TrainConfig())


def test_default_config_builds_a_valid_model():
    cfg = train.TrainConfig()
    config = train.build_model_config(cfg, cfg.vocab_size)
    assert config == ModelConfig.preset("tiny", vocab_size=2048) and config.d_model == 128
    for name in ("adamw", "muon", "soap"):
        cfg.optimizer = name
        opt = train.build_optimizer(TransformerLM(ModelConfig(**{**_TINY_MODEL,
                                                               "vocab_size": 300})),
                                    cfg, torch.device("cpu"))
        assert type(opt).__name__.lower() == name
    with pytest.raises(ValueError, match="optimizer"):
        cfg.optimizer = "sgd"
        train.build_optimizer(TransformerLM(ModelConfig(**{**_TINY_MODEL, "vocab_size": 300})),
                              cfg, torch.device("cpu"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's import
def test_checkpoint_round_trip_and_atomic_save(tmp_path, monkeypatch):
    torch.manual_seed(4)
    config = ModelConfig(**{**_TINY_MODEL, "vocab_size": 50})
    model = TransformerLM(config)
    opt = train.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        train.cross_entropy(model(torch.randint(50, (2, 8))), torch.randint(50, (2, 8))).backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path / "ckpt.pt"
    # saving the compiled wrapper stores the plain model's keys
    train.save_checkpoint(torch.compile(model), opt, 2, path, note="hello")
    model2 = TransformerLM(config)
    opt2 = train.AdamW(model2.parameters(), lr=1e-2)
    assert train.load_checkpoint(path, model2, opt2) == 2
    for (k, a), (k2, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert str(opt.state_dict()) == str(opt2.state_dict())
    assert train.read_checkpoint(path)["note"] == "hello"

    # a crash in the middle of a save leaves the previous checkpoint whole
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(train.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(model, opt, 3, path)
    assert path.read_bytes() == before
    with pytest.raises(FileNotFoundError):
        train.load_checkpoint(tmp_path / "none.pt", model2)


def test_killed_and_resumed_run_reproduces_the_losses_bit_for_bit(_cache, tmp_path, monkeypatch):
    """Exact only single-threaded on a CPU (the _one_thread fixture): with several threads the
    reductions' order varies, and two uninterrupted runs already differ by ~1e-6."""
    assert torch.get_num_threads() == 1
    kw = dict(max_iters=8, checkpoint_interval=4, eval_interval=4, grad_accum_steps=2)
    whole = train.train(_cfg(_cache, tmp_path / "whole", **kw))

    calls = {"n": 0}
    real_step = train.train_step

    def killed_at_step_7(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # the job is killed after 6 steps, 2 after the checkpoint
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train.train(_cfg(_cache, tmp_path / "resumed", **kw))
    monkeypatch.setattr(train, "train_step", real_step)
    assert train.read_checkpoint(tmp_path / "resumed" / "ckpt.pt")["iteration"] == 4
    resumed = train.train(_cfg(_cache, tmp_path / "resumed", resume=True, **kw))

    for key in ("loss", "grad_norm", "lr", "val_loss"):
        a = _rows(tmp_path / "whole" / "metrics.jsonl", key)
        b = _rows(tmp_path / "resumed" / "metrics.jsonl", key)
        assert a == b and len(a) >= 2  # exact float equality, every logged step
    assert len(_rows(tmp_path / "resumed" / "metrics.jsonl", "loss")) == 8  # no stale rows
    for a, b in zip(whole["model"].parameters(), resumed["model"].parameters()):
        assert torch.equal(a, b)
    assert resumed["val_loss"] == whole["val_loss"]


def test_resume_refuses_a_changed_model_or_missing_checkpoint(_cache, tmp_path):
    train.train(_cfg(_cache, tmp_path, max_iters=2, eval_interval=0))
    with pytest.raises(ValueError, match="d_model=32 in the checkpoint but 64"):
        train.train(_cfg(_cache, tmp_path, max_iters=4, resume=True, d_model=64))
    with pytest.raises(ValueError, match="optimizer='adamw' in the checkpoint but 'muon'"):
        train.train(_cfg(_cache, tmp_path, max_iters=4, resume=True, optimizer="muon"))
    with pytest.raises(ValueError, match="batch_size=4 in the checkpoint but 8"):
        train.train(_cfg(_cache, tmp_path, max_iters=4, resume=True, batch_size=8))
    with pytest.raises(FileNotFoundError):
        train.train(_cfg(_cache, tmp_path / "empty", resume=True))


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(_cache, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = train.fused_cross_entropy  # the training loss LossModel calls

    def nan_from_step_5(logits, targets, ignore_index=-100, vocab_size=None):
        calls["n"] += 1
        loss = real_loss(logits, targets, ignore_index, vocab_size)
        return loss * math.nan if calls["n"] >= 5 else loss

    monkeypatch.setattr(train, "fused_cross_entropy", nan_from_step_5)
    cfg = _cfg(_cache, tmp_path, max_iters=8, checkpoint_interval=2, eval_interval=0)
    with pytest.raises(FloatingPointError, match="iteration 5.*last good checkpoint"):
        train.train(cfg)
    state = train.read_checkpoint(tmp_path / "ckpt.pt")
    assert state["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_tokenizer_dir_alone_encodes_the_text_with_that_tokenizer(_cache, tmp_path):
    gpt2 = gpt2_tokenizer()
    gpt2.save_dir(tmp_path / "gpt2", gpt2_format=True)
    cfg = _cfg(_cache, tmp_path / "out", tokenizer_dir=str(tmp_path / "gpt2"))
    tok_dir, train_bin, val_bin = train.prepare_data(cfg)
    assert tok_dir == str(tmp_path / "gpt2") and not (tmp_path / "gpt2" / "train.bin").exists()
    for split, path in (("train", train_bin), ("val", val_bin)):
        tokens = train.load_tokens(path, gpt2)  # the sidecar names GPT-2's tokenizer
        text = (Path(path).parent.parent / f"{split}.txt").read_text()
        assert tokens.tolist() == gpt2.encode(text)
    assert train.prepare_data(cfg) == (tok_dir, train_bin, val_bin)  # cached: encoded once
    before = sorted(_cache.rglob("*"))
    Tokenizer({i: bytes([i]) for i in range(256)}, []).save_dir(str(tmp_path / "no_eot"))
    for folder, error, match in (("none", FileNotFoundError, "tokenizer directory not found"),
                                 ("no_eot", ValueError, "no <\\|endoftext\\|> special token")):
        with pytest.raises(error, match=match):  # another text: nothing of it is written
            train.prepare_data(_cfg(_cache, tmp_path / "out", max_text_mb=0.2,
                                    tokenizer_dir=str(tmp_path / folder)))
    assert sorted(_cache.rglob("*")) == before


def test_compile_graphs_needs_one_process_on_a_cuda_gpu(tmp_path):
    with pytest.raises(ValueError, match="--compile=graphs .*needs one process on a CUDA GPU"):
        train.train(_cfg(tmp_path, tmp_path / "out", compile="graphs"))  # on the CPU
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_tokenizer_without_endoftext_fails_before_training(tmp_path):
    tok_dir = tmp_path / "tok"
    Tokenizer({i: bytes([i]) for i in range(256)}, []).save_dir(str(tok_dir))
    cfg = _cfg(tmp_path, tmp_path / "out", tokenizer_dir=str(tok_dir),
               train_bin=str(tmp_path / "train.bin"), val_bin=str(tmp_path / "val.bin"))
    with pytest.raises(ValueError, match="no <\\|endoftext\\|> special token"):
        train.train(cfg)


def test_train_step_backpropagates_the_moe_aux_loss_and_accumulates_micro_batches():
    torch.manual_seed(5)
    config = ModelConfig(**{**_TINY_MODEL, "vocab_size": 40, "num_experts": 4,
                            "experts_top_k": 1})
    model = TransformerLM(config)
    reference = TransformerLM(config)
    reference.load_state_dict(model.state_dict())
    batches = [(torch.randint(40, (2, 8)), torch.randint(40, (2, 8))) for _ in range(2)]
    seen = {}

    class _Record(torch.optim.SGD):  # keeps the gradients the step was given
        def step(self, closure=None):
            seen.update({n: p.grad.clone() for n, p in model.named_parameters()})

    params = list(model.parameters())
    it = iter(batches)
    loss, norm = train.train_step(train.LossModel(model), _Record(params, lr=0.0), params,
                                  lambda: next(it), 2, 0.0, contextlib.nullcontext())
    assert all(p.grad is None for p in params)  # zero_grad(set_to_none=True) after the step
    ce_sum = 0.0
    for x, y in batches:
        ce = F.cross_entropy(reference(x).view(-1, 40), y.view(-1))
        assert reference.aux_loss.item() > 0
        ((ce + reference.aux_loss) / 2).backward()
        ce_sum += ce.item()
    assert loss.item() == pytest.approx(ce_sum / 2, rel=1e-5)  # the logged loss is the CE alone
    for name, p in reference.named_parameters():
        torch.testing.assert_close(seen[name], p.grad, rtol=1e-4, atol=1e-6)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
    torch.testing.assert_close(norm, total, rtol=1e-4, atol=1e-6)


def test_default_main_job_shortened_runs_offline_end_to_end(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(train.urllib.request, "urlopen", no_network)
    # The default job (dataset tinystories), shortened: tiny model, a few steps, little text.
    train.main([f"--cache_dir={tmp_path / 'cache'}", f"--out_dir={tmp_path / 'out'}",
                "--max_text_mb=0.1", "--vocab_size=300", "--max_iters=4", "--eval_interval=2",
                "--eval_iters=2", "--batch_size=4", "--num_samples=2", "--sample_tokens=8",
                "--context_length=16", "--d_model=32", "--num_layers=1", "--num_heads=2",
                "--d_ff=64"])
    out = capsys.readouterr().out
    offline = [line for line in out.splitlines() if "offline" in line]
    assert len(offline) == 1 and "--dataset=pycode" in offline[0]
    assert "unigram baseline" in out and "--- sample 2 ---" in out
    assert (tmp_path / "cache" / f"pycode-{int(0.1 * 2**20)}.txt").exists()
    val = _rows(tmp_path / "out" / "metrics.jsonl", "val_loss")
    assert sorted(val) == [2, 4] and all(math.isfinite(v) for v in val.values())
    assert train.read_checkpoint(tmp_path / "out" / "ckpt.pt")["iteration"] == 4
    assert (tmp_path / "out" / "samples.txt").read_text().count("--- sample") == 2


@pytest.mark.parametrize("optimizer,lr", [("adamw", 1e-2), ("muon", 2e-2), ("soap", 1e-2)])
def test_tiny_model_overfits_a_tiny_corpus_with_each_optimizer(tmp_path, optimizer, lr):
    cfg = _cfg(tmp_path / "cache", tmp_path / "out", data=str(_DATA / "tinystories_sample.txt"),
               val_fraction=0.2, optimizer=optimizer, lr=lr, min_lr=lr, max_iters=100,
               warmup_iters=10, eval_interval=0, log_interval=10, batch_size=16,
               context_length=32, d_model=64, num_layers=2, num_heads=4, d_ff=128,
               weight_decay=0.0, num_samples=0)
    result = train.train(cfg)
    losses = _rows(tmp_path / "out" / "metrics.jsonl", "loss")
    # ~2,000 training tokens, learnt by heart: far below the best loss that ignores context
    assert losses[10] > 3.0 and losses[100] < result["unigram_entropy"] / 4, losses
    assert result["iteration"] == 100


def _recording_get_batch(seen: list) -> "train.Callable":
    real_get_batch = train.get_batch

    def recording_get_batch(tokens, *args, **kwargs):
        x, y = real_get_batch(tokens, *args, **kwargs)
        seen.append(x.tolist())
        return x, y
    return recording_get_batch


_DDP_RUN = dict(max_iters=3, grad_accum_steps=2, eval_interval=3, checkpoint_interval=3,
                num_samples=1, grad_clip=0.1)  # norms ~0.5: clipped, the factor in the update


def _ddp_worker(rank: int, world_size: int, port: int, cache: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen = []
    train.get_batch = _recording_get_batch(seen)
    result = train.train(_cfg(Path(cache), Path(out), **_DDP_RUN))
    params = [p.detach().double().sum().item() for p in result["model"].parameters()]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"batches": seen, "params": params,
                                                         "val_loss": result["val_loss"]}))
    # Rank 0 hosts the rendezvous store (torchrun's agent does that in real runs): it must not
    # exit while rank 1 may still be tearing its process group down, or rank 1 can abort. If
    # rank 1 fails instead, spawn() in the parent ends this process.
    while not all(Path(out, f"rank{r}.json").exists() for r in range(world_size)):
        time.sleep(0.05)


def test_two_process_gloo_run_equals_one_process_on_the_full_batch(_cache, tmp_path, monkeypatch):
    """Both ranks draw the same global batch and take halves of it, and DDP averages their
    gradients: the run is the one-process run with twice the batch, up to float rounding."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(_cache), str(tmp_path / "two")),
                                nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2))
    seen = []
    monkeypatch.setattr(train, "get_batch", _recording_get_batch(seen))
    one = train.train(_cfg(_cache, tmp_path / "one", batch_size=8, **_DDP_RUN))

    assert len(r0["batches"]) == len(r1["batches"]) == len(seen) == 3 * 2 + 2  # + 2 eval batches
    assert all(a != b for a, b in zip(r0["batches"], r1["batches"]))  # each rank its own half
    assert all(a + b == full for a, b, full in zip(r0["batches"], r1["batches"], seen))
    assert r0["params"] == r1["params"]  # DDP kept the replicas identical
    assert r0["val_loss"] == r1["val_loss"]  # averaged over both ranks
    assert r0["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    for key in ("loss", "grad_norm"):
        two_rows = _rows(tmp_path / "two" / "metrics.jsonl", key)
        one_rows = _rows(tmp_path / "one" / "metrics.jsonl", key)
        assert sorted(two_rows) == [1, 2, 3] and two_rows == pytest.approx(one_rows, rel=1e-5)
    state = train.read_checkpoint(tmp_path / "two" / "ckpt.pt")
    assert state["iteration"] == 3 and state["world_size"] == 2
    for name, value in one["model"].state_dict().items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-4, atol=1e-5)


# --- train.py under bad input and interruption: errors early and in one line, nothing lost ---

_real_prepare_data = train.prepare_data


def _nothing_expensive(monkeypatch) -> None:
    """A check that must come first fails the test if the expensive work starts before it."""
    def expensive(*args, **kwargs):
        raise AssertionError("expensive work started before the check")
    for name in ("prepare_data", "train_bpe", "encode_file", "train_step"):
        monkeypatch.setattr(train, name, expensive)


@pytest.mark.parametrize("flags, expected", [
    (["--max_iters=0"], "error: --max_iters must be at least 1, got 0"),
    (["--max_iters=-5", "--lr=-0.1"], "error: --max_iters must be at least 1, got -5; "
                                      "--lr must be at least 0, got -0.1"),
    (["--d_model=30", "--num_heads=4"],
     "error: --preset=tiny with {'d_model': 30, 'num_heads': 4}: "),
    (["--preset=gpt5"], "error: --preset='gpt5': expected one of"),
    (["--max_iter=5"], "error: unknown option --max_iter; did you mean --max_iters?"),
    (["--batch_size=big"], "error: --batch_size expects an integer, got 'big'"),
    (["--beta2=1.0"], "error: --beta2 must be in [0, 1), got 1.0"),
])
def test_bad_settings_fail_at_once_in_one_line(tmp_path, monkeypatch, capsys, flags, expected):
    _nothing_expensive(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        train.run_cli(train.main, [f"--out_dir={tmp_path / 'out'}", *flags])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_late_errors_fail_before_training(_cache, tmp_path, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "train_step", no_training)
    with pytest.raises(ValueError, match="validation split has [0-9,]+ tokens.*length=8192"):
        train.train(_cfg(_cache, tmp_path / "long", context_length=8192))
    # one token id past the vocabulary, anywhere in the file: found when the file is loaded
    tok_dir, train_bin, val_bin = train.prepare_data(_cfg(_cache, tmp_path))
    tokens = np.fromfile(train_bin, dtype=np.uint16)
    tokens[len(tokens) // 2] = 300  # vocab_size is 300: ids 0..299
    bad = tmp_path / "bad.bin"
    tokens.tofile(bad)
    Path(str(bad) + ".json").write_text(Path(train_bin + ".json").read_text())
    with pytest.raises(ValueError, match=f"{bad} holds token id 300, but the tokenizer has only"):
        train.train(_cfg(_cache, tmp_path / "bin", train_bin=str(bad), val_bin=val_bin,
                         tokenizer_dir=tok_dir))
    # folders that cannot be written are named as that (not as being offline), before any work
    _nothing_expensive(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(train.UsageError, match="--out_dir=.*a_file/out is not a writable folder"):
        train.train(_cfg(_cache, blocker / "out"))
    monkeypatch.setattr(train, "prepare_data", _real_prepare_data)  # up to its first check
    with pytest.raises(train.UsageError, match="--cache_dir=.*a_file/cache is not a writable"):
        train.train(_cfg(blocker / "cache", tmp_path / "out", dataset="tinystories"))
    assert "offline" not in capsys.readouterr().out


def test_user_files_are_named_in_errors(tmp_path, monkeypatch, capsys):
    for name in ("train_bpe", "encode_file", "train_step"):
        monkeypatch.setattr(train, name, lambda *a, **k: pytest.fail("work started"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(SystemExit) as exit:
        train.run_cli(train.main, [f"--data={junk}", f"--cache_dir={tmp_path / 'cache'}",
                                   f"--out_dir={tmp_path / 'out'}"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (f"error: --data={junk} is not UTF-8 text (byte 128) (token "
                                       "arrays go in --train_bin, --val_bin and --tokenizer_dir)\n")
    run = tmp_path / "cut"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"PK\x03\x04" + bytes(100))  # a checkpoint cut off early
    with pytest.raises(SystemExit) as exit:
        train.run_cli(train.main, ["--resume", f"--out_dir={run}"])
    err = capsys.readouterr().err
    assert exit.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: checkpoint {run / 'ckpt.pt'} cannot be read")


def test_a_new_run_does_not_take_over_another_runs_out_dir(_cache, tmp_path, monkeypatch):
    train.train(_cfg(_cache, tmp_path, max_iters=2, eval_interval=0))
    results = ("ckpt.pt", "metrics.jsonl", "samples.txt")
    before = {name: (tmp_path / name).read_bytes() for name in results}
    with pytest.raises(train.UsageError, match="holds another run's results .*--overwrite"):
        train.train(_cfg(_cache, tmp_path, max_iters=4))
    # Told to overwrite, a run killed before its first evaluation or checkpoint replaced nothing.
    real_step = train.train_step

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train.train(_cfg(_cache, tmp_path, max_iters=4, overwrite=True))
    assert {name: (tmp_path / name).read_bytes() for name in results} == before
    monkeypatch.setattr(train, "train_step", real_step)
    train.train(_cfg(_cache, tmp_path, max_iters=4, overwrite=True, eval_interval=0))
    assert sorted(_rows(tmp_path / "metrics.jsonl", "loss")) == [1, 2, 3, 4]
    assert train.read_checkpoint(tmp_path / "ckpt.pt")["iteration"] == 4


def test_stale_temp_files_of_a_killed_run_are_removed(_cache, tmp_path):
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"half a checkpoint (kill -9 during a save)")
    (tmp_path / "metrics.jsonl.tmp").write_text('{"iter": 1')
    train.train(_cfg(_cache, tmp_path, max_iters=1, eval_interval=0, num_samples=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "metrics.jsonl",
                                                          "samples.txt"]


def test_ctrl_c_saves_a_final_checkpoint_and_resume_needs_no_flags(_cache, tmp_path, monkeypatch,
                                                                    capsys):
    real_step, calls = train.train_step, {"n": 0}

    def ctrl_c_during_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            train.signal.raise_signal(train.signal.SIGINT)  # as if pressed while step 3 runs
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", ctrl_c_during_step_3)
    flags = [f"--cache_dir={_cache}", f"--out_dir={tmp_path}", "--dataset=pydoc",
             "--max_text_mb=0.1", "--vocab_size=300", "--batch_size=4", "--max_iters=6",
             "--warmup_iters=2", "--eval_interval=3", "--eval_iters=2", "--log_interval=1",
             "--checkpoint_interval=0", "--num_samples=1", "--sample_tokens=8", "--device=cpu",
             *(f"--{k}={v}" for k, v in _TINY_MODEL.items())]
    with pytest.raises(SystemExit) as exit:
        train.run_cli(train.main, flags)
    interrupted = [line for line in capsys.readouterr().err.splitlines()
                   if line.startswith("interrupted")]
    assert exit.value.code == 130 and interrupted == [
        f"interrupted: iteration 3 saved to {tmp_path / 'ckpt.pt'}; continue it with --resume"]
    assert train.read_checkpoint(tmp_path / "ckpt.pt")["iteration"] == 3
    assert sorted(_rows(tmp_path / "metrics.jsonl", "loss")) == [1, 2, 3]
    assert not (tmp_path / "samples.txt").exists()

    # --resume takes the run's configuration from its checkpoint: only what may change is given
    monkeypatch.setattr(train, "train_step", real_step)
    with pytest.raises(train.UsageError, match="lr=0.002 in the checkpoint but 0.1 now"):
        train.main(["--resume", f"--out_dir={tmp_path}", "--lr=0.1"])
    train.main(["--resume", f"--out_dir={tmp_path}", "--max_iters=8"])
    assert sorted(_rows(tmp_path / "metrics.jsonl", "loss")) == list(range(1, 9))
    assert sorted(_rows(tmp_path / "metrics.jsonl", "val_loss")) == [3, 6, 8]
    assert train.read_checkpoint(tmp_path / "ckpt.pt")["iteration"] == 8


def test_pycode_corpus_is_sorted_deterministic_capped_and_clean(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    (lib / "site-packages" / "pkg").mkdir(parents=True)
    (lib / "a.py").write_text("x = 1\n")
    (lib / "site-packages" / "pkg" / "b.py").write_text(f"s = '{_EOT}'\n")
    (lib / "c.py").write_bytes(b"y = '\xff'\n")  # not UTF-8: skipped
    (lib / "notes.txt").write_text("not Python")
    (lib / "table.py").write_text("z = 0\n" * 20_000)  # 120 KB: over max_file_bytes, skipped
    paths = {"stdlib": str(lib), "purelib": str(lib / "site-packages"),
             "platlib": str(lib / "site-packages")}  # nested roots: each file still once
    monkeypatch.setattr(train.sysconfig, "get_paths", lambda: paths)
    text = train.pycode_text(tmp_path / "all.txt", 0).read_text()
    assert sorted(doc.strip() for doc in text.split(f"\n{_EOT}\n")) == ["s = ''", "x = 1"]
    assert train.pycode_text(tmp_path / "again.txt", 0).read_text() == text
    assert _EOT not in train.pycode_text(tmp_path / "capped.txt", 3).read_text()  # one file


def test_plot_draws_losses_and_learning_rate(tmp_path, monkeypatch, capsys):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    rows = [{"iter": i, "tokens": 512 * i, "loss": 5 - i / 5, "lr": 1e-3 * min(1, i / 3)}
            for i in range(1, 11)]
    rows += [{"iter": i, "tokens": 512 * i, "val_loss": 5.1 - i / 5, "unigram_entropy": 4.2}
             for i in (5, 10)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.main(["plot", str(tmp_path)])
    image = matplotlib_image.imread(tmp_path / "loss.png")
    assert image.shape[:2] == (600, 800) and image[..., :3].std() > 0.05  # drawn, not blank
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit) as exit:
        train.run_cli(train.main, ["plot", str(tmp_path)])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "error: plot needs matplotlib: pip install matplotlib\n"


def test_fused_cross_entropy_gives_padded_logits_no_probability_and_no_gradient():
    torch.manual_seed(7)
    logits = (torch.randn(2, 5, 16) * 3).requires_grad_(True)  # 11 real logits, 5 of padding
    targets = torch.randint(11, (2, 5))
    targets[0, 0] = -100
    (train.fused_cross_entropy(logits, targets, vocab_size=11) * 2.0).backward()
    real = logits.detach()[..., :11].clone().requires_grad_(True)
    expected = F.cross_entropy(real.view(-1, 11), targets.view(-1))
    (expected * 2.0).backward()
    torch.testing.assert_close(train.fused_cross_entropy(logits, targets, vocab_size=11), expected)
    torch.testing.assert_close(logits.grad[..., :11], real.grad)
    assert torch.equal(logits.grad[..., 11:], torch.zeros(2, 5, 5))


def test_loss_model_pads_the_head_to_a_multiple_of_64_without_changing_loss_or_gradients():
    torch.manual_seed(6)
    config = ModelConfig(**{**_TINY_MODEL, "vocab_size": 97, "tie_weights": True})
    model = TransformerLM(config)
    step_model = train.LossModel(model)
    assert step_model.pad_rows == 31  # the matmul runs with 128 rows; the model keeps 97
    x, y = torch.randint(97, (2, 8)), torch.randint(97, (2, 8))
    loss, _ = step_model(x, y)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = F.cross_entropy(model(x).view(-1, 97), y.view(-1))
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for name, p in model.named_parameters():  # (atol: float32 sums in another order, ~1e-7 off)
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-6)
    assert model.lm_head.weight.shape == (97, config.d_model)


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@_CUDA
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import
def test_bf16_compiled_training_step_on_cuda_learns():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(**{**_TINY_MODEL, "vocab_size": 64})).cuda()
    params = list(model.parameters())
    optimizer = train.AdamW(params, lr=3e-3, foreach=True, fused=True)
    step_model = torch.compile(train.LossModel(model))
    autocast = train.autocast_for(torch.device("cuda"), torch.bfloat16)
    x, y = (torch.randint(64, (8, 16), device="cuda") for _ in range(2))
    losses = [train.train_step(step_model, optimizer, params, lambda: (x, y), 2, 1.0,
                               autocast)[0].item() for _ in range(40)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0] - 1.0, losses
    assert all(p.dtype == torch.float32 for p in params)  # autocast: weights stay float32


@_CUDA
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import
def test_fused_adamw_on_cuda_matches_torch_fused_adamw():
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(64, 32), (32,), (3, 5, 7)]
    ours = [nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    optimizers = (AdamW(ours, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True),
                  torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                                    fused=True))
    for t in range(20):
        grads = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
        for opt, params in zip(optimizers, (ours, theirs)):
            opt.param_groups[0]["lr"] = 1e-2 / (1 + t)  # a schedule: no recompiles, same math
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@_CUDA
def test_newtonschulz_on_cuda_near_float64():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(3, 64, 64), (3, 64, 192), (3, 192, 64)]:  # bf16 plain; float16 Gram, both ways
        G = torch.randn(shape, device="cuda", generator=gen)
        if shape[1] == shape[2]:  # random square matrices have singular values near 0
            G = G + 24 * torch.eye(shape[1], device="cuda")
        X = (G.mT if shape[1] > shape[2] else G).double()
        X = X / X.norm(dim=(-2, -1), keepdim=True)
        for _ in range(5):
            X = _newtonschulz_polynomial(X @ X.mT) @ X
        expected = X.mT if shape[1] > shape[2] else X
        out = zeropower_via_newtonschulz(G)
        assert out.dtype == G.dtype and out.shape == G.shape
        error = float((out.double() - expected).norm() / expected.norm())
        assert error < (0.01 if shape[1] != shape[2] else 0.08), (shape, error)  # bf16: 2-4%


# =================================================================================================
# kernels.py
# =================================================================================================


import types  # noqa: E402

TINY = ["--vocab_size=64", "--context_length=16", "--d_model=32", "--num_layers=1",
        "--num_heads=2", "--d_ff=64", "--batch_size=2", "--device=cpu"]


# kernels.py: bench --------------------------------------------------------------------------------
def test_bench_rows_for_each_mode_on_cpu(capsys):
    """Replaces test_all.py's test_bench_runs_the_training_step_on_cpu."""
    cfg = train.parse_config(["--preset=tinystories", "--steps=3", "--warmup_steps=1", *TINY],
                             kernels.BenchConfig())
    rows = kernels.bench(cfg)
    assert [row["mode"] for row in rows] == ["fwd", "fwd_bwd", "step"]
    params = M.count_params(ModelConfig.preset(
        "tinystories", vocab_size=64, context_length=16, d_model=32, num_layers=1, num_heads=2,
        d_ff=64))["total"]
    for row in rows:
        assert row["preset"] == "tinystories" and row["params"] == params
        assert row["batch_size"] == 2 and row["context_length"] == 16
        assert row["compile"] is False and row["dtype"] == "float32" and row["mfu"] is None
        assert row["tok_per_s"] == pytest.approx(2 * 16 / (row["ms_per_step"] / 1e3))
        assert 0 < row["min_ms"] <= row["ms_per_step"] <= row["max_ms"] and row["std_ms"] >= 0
        assert row["std_ms"] <= row["max_ms"] - row["min_ms"] and len(row["first_ms"]) == 3
        assert row["tflops"] > 0 and row["peak_gb"] is None
    # forward counts a third of training's FLOPs per token
    per_token = M.mfu_flops_per_token(ModelConfig.preset(
        "tinystories", vocab_size=64, context_length=16, d_model=32, num_layers=1, num_heads=2,
        d_ff=64), 16)
    fwd, _, step = rows
    assert fwd["tflops"] * 1e12 == pytest.approx(per_token / 3 * fwd["tok_per_s"])
    assert step["tflops"] * 1e12 == pytest.approx(per_token * step["tok_per_s"])
    assert step["optimizer"] == "adamw" and fwd["optimizer"] is None
    assert step["minutes_for_327M_tokens"] == pytest.approx(327_680_000 / step["tok_per_s"] / 60)
    out = capsys.readouterr().out
    assert "tinystories: 0.0M params, batch 2 x 16, vocab 64, cpu" in out
    assert "the course's TinyStories run" in out and "fwd_bwd False   float32" in out


def test_bench_grid_expands_course_and_lists():
    cfg = kernels.BenchConfig(preset="course,tiny", context_length="128,256", mode="fwd_bwd",
                              compile="False,True", dtype="float32,bfloat16")
    grid, modes = kernels.bench_grid(cfg, torch.device("cpu"))
    assert modes == ["fwd_bwd"] and len(grid) == 6 * 2 * 2 * 2
    assert [g[0] for g in grid[::8]] == ["small", "medium", "large", "xl", "2.7B", "tiny"]
    assert {g[1] for g in grid} == {128, 256} and {g[2] for g in grid} == {False, True}
    assert {g[3] for g in grid} == {torch.float32, torch.bfloat16}
    # "auto" compiles on CUDA only, and never the course sizes (their table is eager PyTorch)
    auto = kernels.BenchConfig(preset="small,nanogpt")
    assert [g[2] for g in kernels.bench_grid(auto, torch.device("cpu"))[0]] == [False, False]
    assert [g[2] for g in kernels.bench_grid(auto, torch.device("cuda"))[0]] == [False, True]
    graphs = kernels.BenchConfig(preset="tiny", compile="graphs", mode="fwd", steps=1,
                                 warmup_steps=1)  # reduce-overhead: CUDA graphs where there is CUDA
    assert [g[2] for g in kernels.bench_grid(graphs, torch.device("cpu"))[0]] == ["graphs"]
    run = kernels.prepare(graphs, "tiny", 16, "graphs", torch.float32, torch.device("cpu"))
    assert hasattr(run.step_model, "_orig_mod")  # compiled (lazily: nothing runs here)
    assert M.PRESETS["2.7B"]["d_model"] == 2560 and kernels.BENCH_BATCH["xl"] == 4


@pytest.mark.parametrize("setting,message", [
    (dict(preset="gpt3"), "--preset=gpt3: expected"), (dict(mode="fwd,bwd"), "--mode=fwd,bwd"),
    (dict(dtype="fp16"), "--dtype=fp16"), (dict(compile="yes"), "--compile=yes"),
    (dict(context_length="128,0"), "--context_length=128,0"), (dict(steps=0), "--steps=0"),
    (dict(warmup_steps=-1), "--warmup_steps")])
def test_bench_bad_settings_are_usage_errors(setting, message):
    with pytest.raises(UsageError, match=message):
        kernels.bench(kernels.BenchConfig(device="cpu", **setting))


def test_bench_without_warmup_flags_the_first_step(capsys):
    cfg = train.parse_config(["--preset=tiny", "--mode=fwd", "--steps=3", "--warmup_steps=0",
                              *TINY], kernels.BenchConfig())
    (row,) = kernels.bench(cfg)
    assert row["mean_without_first_ms"] == pytest.approx(
        (3 * row["ms_per_step"] - row["first_ms"][0]) / 2)
    assert "no warm-up: the first step" in capsys.readouterr().out


def test_time_each_times_each_call_on_cpu():
    calls = []
    times = kernels.time_each(lambda: calls.append(sum(range(20_000))), 4, torch.device("cpu"))
    assert len(calls) == len(times) == 4 and all(t > 0 for t in times)


# kernels.py: profile and the command line ---------------------------------------------------------
def test_time_by_kind_sorts_real_kernel_names():
    names = {  # from the profiler on the H200: a compiled nanogpt step, ours and PyTorch's
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "matmul",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)": "attention",
        "_flash_bwd_dkdv_kernel": "attention", "_flash_bwd_dq_kernel": "attention",
        "_bwd_preprocess_kernel": "attention",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::": "memory-bound",
        "triton_red_fused__to_copy__unsafe_view_logsumexp_masked_fill_11": "memory-bound",
        "_cross_entropy_kernel": "memory-bound", "_rmsnorm_bwd_kernel": "memory-bound",
        "Memset (Device)": "memory-bound"}
    for i, (name, kind) in enumerate(names.items()):
        total = kernels.time_by_kind([(name, 2.0 ** i), ("_swiglu_fwd_kernel", 0.5)])
        assert total[kind] == 2.0 ** i + (kind == "memory-bound") * 0.5
        assert sum(total.values()) == 2.0 ** i + 0.5


def test_profile_on_cpu_prints_the_table_and_skips_the_snapshot(tmp_path, capsys):
    out = tmp_path / "snap.pickle"
    kernels.main(["profile", "--steps=1", "--warmup_steps=1", f"--out={out}", *TINY])
    printed = capsys.readouterr().out
    assert "profile tiny" in printed and "Self CPU time total" in printed
    assert "aten::mm" in printed  # the matmuls are among the top operators
    assert "need CUDA" in printed and not out.exists()


@pytest.mark.parametrize("kernels_impl", ["torch", "triton"])  # triton: blocks pass (x, branch)
def test_checkpointed_blocks_give_the_same_loss_and_gradients(kernels_impl):
    config = ModelConfig.preset("tiny", vocab_size=50, context_length=8, d_model=16,
                                num_layers=2, num_heads=2, d_ff=32, kernels=kernels_impl)
    torch.manual_seed(0)
    plain, checkpointed = TransformerLM(config), TransformerLM(config)
    checkpointed.load_state_dict(plain.state_dict())
    kernels.checkpoint_blocks(checkpointed)
    x = torch.randint(50, (2, 8))
    losses = [train.LossModel(m)(x, x)[0] for m in (plain, checkpointed)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def test_kernels_main_runs_bench_and_train_py_points_to_it(capsys):
    """Replaces the test of the same name in test_all.py."""
    kernels.main(["bench", "--preset=tinystories", "--steps=1", "--warmup_steps=0", *TINY])
    out = capsys.readouterr().out
    assert "tinystories:" in out and "tok/s" in out and "the course's TinyStories run" in out
    kernels.main(["-h"])
    assert "python kernels.py profile" in capsys.readouterr().out
    with pytest.raises(UsageError, match="unknown command 'lessons'; the commands are bench"):
        kernels.main(["lessons"])
    with pytest.raises(UsageError, match="unknown option --preset"):
        kernels.main(["attention", "--preset=nanogpt"])
    with pytest.raises(UsageError, match="--head_dims=abc: expected positive integers"):
        kernels.main(["attention", "--head_dims=abc"])
    with pytest.raises(UsageError, match="unknown option --stepz"):
        kernels.main(["bench", "--stepz=3"])
    with pytest.raises(UsageError, match=r"moved: python kernels\.py bench"):
        train.main(["bench", "--preset=nanogpt"])


# train.py: the prefetching batch iterator ---------------------------------------------------------
def _run(tokens: np.ndarray, generator: torch.Generator, start_iter: int,
         device: str = "cpu") -> train.Run:
    """A train.Run with only what next_batch needs: 5 steps of 2 micro-batches of 3 x 8."""
    cfg = train.TrainConfig(batch_size=3, grad_accum_steps=2, max_iters=5)
    return train.Run(cfg, 0, 1, torch.device(device), Path("unused"),
                     types.SimpleNamespace(vocab_size=97), tokens, tokens,
                     types.SimpleNamespace(context_length=8), nn.Linear(2, 2), None, None, None,
                     None, generator, start_iter, [], None)


def test_prefetched_batches_equal_get_batch_and_resume_exactly(monkeypatch):
    tokens = (np.arange(500) % 97).astype(np.uint16)
    plain_gen = torch.Generator().manual_seed(5)
    plain = [train.get_batch(tokens, 3, 8, "cpu", plain_gen) for _ in range(12)]
    calls = []
    real = train.get_batch
    monkeypatch.setattr(train, "get_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = _run(tokens, torch.Generator().manual_seed(5), 0)
    saved = None
    for i in range(10):  # the run's 5 x 2 micro-batches
        x, y = run.next_batch()
        assert torch.equal(x, plain[i][0]) and torch.equal(y, plain[i][1])
        if i == 3:  # a checkpoint after step 2: the generator stands after 4 batches
            saved = run.generator.get_state()
    assert len(calls) == 10  # none drawn beyond the run's last batch
    # resuming at step 2 from the saved state gives batches 4..9 again
    resumed = _run(tokens, torch.Generator().set_state(saved), 2)
    for i in range(4, 10):
        assert torch.equal(resumed.next_batch()[0], plain[i][0])
    # past the planned end it keeps drawing the same sequence, one batch per call
    assert torch.equal(resumed.next_batch()[0], plain[10][0])
    assert torch.equal(resumed.next_batch()[0], plain[11][0])


# train.py: Muon's batched Newton-Schulz -----------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 12, 7), (3, 20, 6), (2, 3, 8, 8)])
def test_batched_newtonschulz_equals_each_matrix_alone(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    batched = zeropower_via_newtonschulz(G)
    alone = torch.stack([zeropower_via_newtonschulz(g) for g in G.reshape(-1, *shape[-2:])])
    assert batched.shape == G.shape
    torch.testing.assert_close(batched.reshape(-1, *shape[-2:]), alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expected a matrix"):
        zeropower_via_newtonschulz(torch.ones(3))


def test_muon_skips_a_group_without_gradients():
    used, unused = nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(4, 3))
    opt = Muon([{"params": [used]}, {"params": [unused]}], lr=0.1)
    opt.step()  # no gradient anywhere: nothing happens
    used.grad = torch.randn(4, 3)
    opt.step()
    assert not torch.equal(used, torch.ones(4, 3)) and torch.equal(unused, torch.ones(4, 3))
    assert len(opt.state[unused]) == 0


class _PerMatrixMuon(Muon):
    """The previous Muon step, one matrix at a time: the reference for the batched one."""
    def _update(self, grad_scale: torch.Tensor | None) -> None:
        for group, params in self._groups_with_grads():
            self._scale_in_place([p.grad for p in params], grad_scale)
            if not group["use_muon"]:
                self._adamw_step(group, params, None)
                continue
            lr, momentum = group["lr"], group["momentum"]
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                u = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                matrix = u.reshape(u.size(0), -1)
                update = zeropower_via_newtonschulz(matrix, group["ns_steps"]).reshape(p.shape)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * 0.2 * max(matrix.shape) ** 0.5)


@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_step_equals_the_per_matrix_step(nesterov):
    config = ModelConfig.preset("tiny", vocab_size=40, context_length=8, d_model=16,
                                num_layers=2, num_heads=2, d_ff=24)
    torch.manual_seed(0)
    models = [TransformerLM(config), TransformerLM(config)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [cls(param_groups_for_muon(m, lr=2e-2, adam_lr=1e-2, weight_decay=0.1),
                      nesterov=nesterov) for cls, m in zip((Muon, _PerMatrixMuon), models)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(40, (4, 8), generator=gen)
        for m, opt in zip(models, optimizers):
            train.LossModel(m)(x, x)[0].backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p in models[0].parameters():
        if "momentum_buffer" in optimizers[0].state[p]:
            q = dict(zip(models[0].parameters(), models[1].parameters()))[p]
            torch.testing.assert_close(optimizers[0].state[p]["momentum_buffer"],
                                       optimizers[1].state[q]["momentum_buffer"])


# On one GPU (the H200) ----------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_in_cuda_graphs_equals_compiled_training(_cache, tmp_path):
    for mode in (True, "graphs"):  # --compile=graphs replays the same compiled kernels
        train.train(_cfg(_cache, tmp_path / str(mode), device="cuda", compile=mode, max_iters=8,
                         eval_interval=4))
    for key in ("loss", "val_loss"):
        compiled, graphs = (_rows(tmp_path / str(mode) / "metrics.jsonl", key)
                            for mode in (True, "graphs"))
        assert len(compiled) >= 2 and graphs == pytest.approx(compiled, rel=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_profile_and_compiled_muon_on_gpu(tmp_path, capsys):
    gpu = [a for a in TINY if a != "--device=cpu"] + ["--steps=2", "--warmup_steps=1"]
    rows = kernels.bench(train.parse_config(["--preset=tiny", "--compile=False", *gpu],
                                            kernels.BenchConfig()))
    assert all(r["peak_gb"] > 0 and r["min_ms"] <= r["ms_per_step"] <= r["max_ms"]
               for r in rows)
    out = tmp_path / "snap.pickle"
    result = kernels.profile(train.parse_config(
        ["--preset=tiny", "--compile=False", f"--out={out}", "--batch_size=8", "--steps=1",
         "--warmup_steps=1"], kernels.ProfileConfig()))  # 4 layers of 128 wide, 8 x 128 tokens
    assert out.stat().st_size > 0 and "CUDA" in result["table"]
    kinds = result["ms_by_kind"]  # the kernels' time, not also the ranges around them
    assert kinds["matmul"] > 0 and kinds["memory-bound"] > 0
    assert sum(kinds.values()) < result["step_ms"]
    assert 0 < result["peak_gb"]["checkpointed"] < result["peak_gb"]["plain"]
    steps = []  # Muon's compiled update (bf16 on the GPU) against the foreach one
    for fused in (False, True):
        gen = torch.Generator("cuda").manual_seed(0)
        weights = [nn.Parameter(torch.randn(*shape, device="cuda", generator=gen))
                   for shape in ((64, 32), (32, 64), (48, 48), (32, 96))]  # last: Gram
        for w in weights:
            w.grad = torch.randn(w.shape, device="cuda", generator=gen)
        before = [w.detach().clone() for w in weights]
        Muon(weights, lr=0.01, fused=fused).step()
        steps.append([(b - w.detach()) / (0.01 * 0.2 * max(w.shape) ** 0.5)
                      for w, b in zip(weights, before)])
    for foreach_step, fused_step in zip(*steps):
        torch.testing.assert_close(fused_step, foreach_step, rtol=0.05, atol=0.02)
    tokens = (np.arange(500) % 97).astype(np.uint16)
    run, gen = _run(tokens, torch.Generator().manual_seed(5), 0, "cuda"), torch.Generator()
    gen.manual_seed(5)
    for _ in range(10):  # drawn, pinned and copied by the worker thread, on the run's GPU
        x, _ = run.next_batch()
        assert x.is_cuda and torch.equal(x, train.get_batch(tokens, 3, 8, "cuda", gen)[0])
    weights = [nn.Parameter(torch.randn(32, 16, device="cuda")) for _ in range(3)]
    opt = Muon(weights, lr=0.01, fused=True)
    for w in weights:
        w.grad = torch.randn_like(w)
    before = [w.detach().clone() for w in weights]
    opt.step()
    for w, b in zip(weights, before):
        update = (b - w.detach()) / (0.01 * 0.2 * 32**0.5)
        s = torch.linalg.svdvals(update.float())
        assert s.min() > 0.5 and s.max() < 1.4


from kernels import (classify, floating_point, gelu_five_ways,  # noqa: E402
                     gelu_triton, matmul_bench, matmul_cost, matmul_triton, model_ops, roofline,
                     softmax_bench, softmax_triton)
from model import gelu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.filterwarnings("ignore:overflow encountered")  # numpy's exp2 under the interpreter
@pytest.mark.parametrize("n", [1, 1000, 1024, 2500])  # 1000 and 2500: a ragged last block
def test_gelu_triton_matches_torch(n):
    torch.manual_seed(0)
    x = torch.randn(n, device=DEVICE) * 4
    x[0] = -30.0  # e^(-2u) overflows to inf: the kernel must give -0, not NaN
    torch.testing.assert_close(gelu_triton(x), F.gelu(x, approximate="tanh"), atol=1e-5, rtol=1e-5)


def test_gelu_tanh_form_is_close_to_the_exact_gelu():
    x = torch.linspace(-8, 8, 10_001, dtype=torch.float64)
    assert (M.gelu_tanh(x) - gelu(x)).abs().max() < 5e-4  # model.py's erf form


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gelu_triton_half_types_compute_in_fp32(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 333, device=DEVICE, dtype=dtype)
    y = gelu_triton(x)
    assert y.dtype == dtype and y.shape == x.shape
    # fp32 inside, one rounding at the store: at most one half-type ulp from the fp32 answer
    torch.testing.assert_close(y, F.gelu(x.float(), approximate="tanh").to(dtype))


@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (2, 3, 129), (4, 1000)])
def test_softmax_triton_matches_torch(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE) * 3
    torch.testing.assert_close(softmax_triton(x), torch.softmax(x, -1), atol=1e-6, rtol=1e-5)


def test_softmax_triton_survives_values_that_overflow_exp():
    x = torch.tensor([[1000.0, 999.0, 998.0], [-1000.0, 0.0, 90.0]], device=DEVICE)
    assert torch.isinf(torch.exp(x)).any()  # the naive formula would give inf / inf = nan
    y = softmax_triton(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.softmax(x, -1))
    torch.testing.assert_close(y.sum(-1), torch.ones(2, device=DEVICE))


def test_softmax_triton_bf16():
    torch.manual_seed(0)
    x = torch.randn(7, 301, device=DEVICE, dtype=torch.bfloat16) * 5
    torch.testing.assert_close(softmax_triton(x), torch.softmax(x.float(), -1).bfloat16())


@pytest.mark.parametrize("m, k, n", [(33, 47, 29), (32, 32, 32), (1, 70, 5), (65, 16, 100)])
def test_matmul_triton_fp32_ragged_shapes(m, k, n):
    torch.manual_seed(0)
    a, b = torch.randn(m, k, device=DEVICE), torch.randn(k, n, device=DEVICE)
    # A GPU's tl.dot rounds fp32 inputs to tf32 (10-bit mantissa); the interpreter does not.
    tol = 1e-2 if DEVICE == "cuda" else 1e-5
    torch.testing.assert_close(matmul_triton(a, b), a @ b, atol=tol, rtol=tol)


# Triton's interpreter computes bf16 tl.dot on the raw bits (numpy has no bf16), so on a CPU
# matmul_triton refuses bf16 and only fp16 is tested; the GPU runs both.
@pytest.mark.parametrize("dtype", [torch.float16] + [torch.bfloat16] * torch.cuda.is_available())
def test_matmul_triton_half_types_and_strides(dtype):
    torch.manual_seed(0)
    a = torch.randn(50, 40, device=DEVICE, dtype=dtype)
    b = torch.randn(70, 40, device=DEVICE, dtype=dtype).t()  # non-contiguous: strides (1, 40)
    c = matmul_triton(a, b)
    assert c.dtype == dtype and c.shape == (50, 70)
    # fp32 accumulation, one rounding at the end: close to the fp32 product of the same inputs
    torch.testing.assert_close(c.float(), a.float() @ b.float(), atol=0.05, rtol=1e-2)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(8, 6, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        gelu_triton(torch.arange(10, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        gelu_triton(x.t())
    with pytest.raises(ValueError, match="contiguous"):
        softmax_triton(x.t())
    with pytest.raises(ValueError, match="registers"):
        softmax_triton(torch.zeros(1, 2**15 + 1, device=DEVICE))
    with pytest.raises(ValueError, match=r"\(M, K\) @ \(K, N\)"):
        matmul_triton(x, x)
    with pytest.raises(ValueError, match="one dtype"):
        matmul_triton(x, x.t().half())
    with pytest.raises(ValueError, match="dtype"):
        matmul_triton(x.int(), x.t().int())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="interpreter"):
            matmul_triton(x.bfloat16(), x.t().bfloat16())


def test_roofline_classification_on_h200_numbers():
    bandwidth, peak = 4.8e12, 989e12  # H200 HBM3e bytes/s, dense bf16 FLOP/s: ridge ~206
    flops, nbytes = matmul_cost(4096, 4096, 4096)
    assert (flops, nbytes) == (2 * 4096**3, 2 * 3 * 4096**2)
    square = classify(flops, nbytes, bandwidth, peak)
    assert square["bound"] == "compute" and square["intensity"] == pytest.approx(4096 / 3)
    assert square["predicted_s"] == pytest.approx(flops / peak)
    n = 2**24
    add = classify(n, 3 * 2 * n, bandwidth, peak)  # bf16 x + y: read two, write one
    assert add["bound"] == "memory" and add["predicted_s"] == pytest.approx(6 * n / bandwidth)
    # decoding one token: each weight is read for 2 FLOPs, far below any GPU's ridge
    assert classify(*matmul_cost(1, 4096, 4096), bandwidth, peak)["bound"] == "memory"
    bounds = {name: classify(f, b, bandwidth, peak)["bound"] for name, f, b in model_ops()}
    assert bounds["square 4096x4096 @ 4096x4096"] == "compute"
    assert bounds["attention scores QK^T T=4096"] == "memory"  # FlashAttention's reason to be
    # exactly at the ridge point the two times are equal: call it compute-bound
    assert classify(206.0, 1.0, 1.0, 206.0)["bound"] == "compute"


def test_roofline_measures_this_device(capsys):
    result = roofline(DEVICE)
    assert result["bandwidth"] > 1e8 and result["peak"] > 1e8  # bytes/s and FLOP/s, not ms
    assert result["ridge"] == pytest.approx(result["peak"] / result["bandwidth"])
    ops = {row["op"]: row for row in result["ops"]}
    assert ops["add x + y"]["bound"] == "memory"
    assert ops["training FFN 8192x4096 @ 4096x16384"]["bound"] == "compute"
    assert "ridge point" in capsys.readouterr().out


def test_floating_point_facts(capsys):
    fp = floating_point("cpu")
    formats = fp["formats"]
    assert formats["fp16"]["max"] == 65504.0
    assert formats["bf16"]["max"] == pytest.approx(3.39e38, rel=1e-3)
    assert formats["fp8 e4m3"]["max"] == 448.0 and formats["fp8 e5m2"]["max"] == 57344.0
    assert [(formats[k]["exponent"], formats[k]["mantissa"]) for k in formats] == [
        (8, 23), (5, 10), (8, 7), (4, 3), (5, 2)]
    assert all(1 + f["exponent"] + f["mantissa"] == f["bits"] for f in formats.values())
    assert formats["bf16"]["min_normal"] == formats["fp32"]["min_normal"]  # same range
    assert formats["fp16"]["eps"] == 2.0**-10
    # adding 1e-4 to 1.0 ten thousand times: fp16 and bf16 never move, fp32 gets about 2
    assert fp["accumulate"]["fp16"] == 1.0 and fp["accumulate"]["bf16"] == 1.0
    assert fp["accumulate"]["fp32"] == pytest.approx(2.0, abs=1e-3)
    assert fp["accumulate"]["torch.sum(fp16)"] == pytest.approx(2.0, abs=1e-3)  # adds in fp32
    assert fp["fp8"]["as is"] == 1.0 and fp["fp8"]["scaled"] < 0.05  # all zeros; 3 bits' worth
    # CPU autocast (torch 2.13): matmul and linear run in bf16 whatever comes in; softmax, sum,
    # exp, layer_norm, add are not on its lists, so they keep their input's dtype (CUDA autocast
    # upcasts softmax, log_softmax, layer_norm, sum and exp to fp32); cross_entropy is on CPU
    # autocast's fp32 list, so even bf16 logits give an fp32 loss.
    autocast = fp["autocast"]
    assert autocast["matmul"] == autocast["linear"] == ("bfloat16", "bfloat16")
    assert autocast["cross_entropy"] == ("float32", "float32")
    for op in ("softmax", "sum", "exp", "add", "layer_norm"):
        assert autocast[op][0] == "float32", op
    assert "fp8 e4m3" in capsys.readouterr().out


def test_benches_run_and_check_at_tiny_sizes(capsys):
    device = torch.device(DEVICE)
    softmax = softmax_bench(device, 4, 33)
    assert set(softmax) == {"eager formula", "torch.softmax", "Triton"}
    assert all(v > 0 for v in softmax.values())
    tflops = matmul_bench(device, (40,))
    assert all(v > 0 for row in tflops.values() for v in row.values())
    assert "GB/s" in capsys.readouterr().out


@needs_cuda
def test_gelu_five_ways_on_gpu_prints_ptx():
    result = gelu_five_ways(2**20, "cuda")
    assert set(result["gbps"]) == {"eager formula", "F.gelu(tanh)", "torch.compile", "Triton"}
    assert ".entry" in result["ptx"] and "ex2.approx" in result["ptx"]


@needs_cuda
def test_kernels_at_gpu_shapes():
    torch.manual_seed(0)
    a, b = (torch.randn(1000, 1000, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    torch.testing.assert_close(matmul_triton(a, b).float(), a.float() @ b.float(),
                               atol=0.05 * math.sqrt(1000), rtol=2e-2)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(softmax_triton(x), torch.softmax(x.float(), -1).bfloat16())


from torch.func import functional_call  # noqa: E402


# Triton kernels run on the GPU where there is one, else in the interpreter on the CPU
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def fused_in_kernels():
    """float32 matmuls without TF32, so that the two paths compare at float32 tolerances."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


def outputs_and_grads(fn, *inputs, seed: int = 1) -> list[torch.Tensor]:
    """fn's outputs, then the gradients of every float input for a fixed random upstream grad."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(inputs[0].device).manual_seed(seed)
    ups = [torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], ups)
    return [*outs, *grads]


def assert_same(fn, ref, *inputs, tol: float) -> None:
    for got, want in zip(outputs_and_grads(fn, *inputs), outputs_and_grads(ref, *inputs),
                         strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = want.float().abs().max() + 1e-6  # relative to the largest value
        assert (got.float() - want.float()).abs().max() <= tol * scale, (got, want)


def reference_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """model.py's RMSNorm, with weight passed in so that its gradient can be taken."""
    return functional_call(M.RMSNorm(weight.shape[0], eps), {"weight": weight}, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 100), (2, 5, 48), (3, 5)])  # rows % block != 0, odd D
def test_triton_rmsnorm_matches_model_rmsnorm(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=DEV) * 3
    weight = 1 + 0.1 * torch.randn(shape[-1], device=DEV)
    assert_same(kernels.rmsnorm_triton, reference_rmsnorm, x, weight, tol=TOL[dtype])


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32),
                                    (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16)])  # autocast's stream + branch
def test_fused_add_rmsnorm_matches_add_then_rmsnorm(dtypes):
    torch.manual_seed(0)
    x, residual = (torch.randn(3, 7, 40, device=DEV).to(dtype) for dtype in dtypes)
    weight = 1 + 0.1 * torch.randn(40, device=DEV)
    assert_same(kernels.fused_add_rmsnorm,
                lambda x, r, w: (reference_rmsnorm(x + r, w), x + r), x, residual, weight,
                tol=TOL[torch.bfloat16 if torch.bfloat16 in dtypes else torch.float32])


def test_rmsnorm_weight_gradient_sums_over_many_programs():
    """More row blocks than programs: each program walks several, the partial dW rows add up."""
    torch.manual_seed(0)
    x, weight = torch.randn(600, 8, device=DEV), torch.randn(8, device=DEV)
    assert_same(kernels.rmsnorm_triton, reference_rmsnorm, x, weight, tol=1e-5)


def swiglu_reference(ab: torch.Tensor) -> torch.Tensor:
    a, b = ab.chunk(2, dim=-1)
    return M.silu(a) * b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gate_matches_silu_times_b(dtype):
    torch.manual_seed(0)
    ab = torch.randn(3, 2 * 1111, device=DEV).to(dtype) * 4  # F = 1111: a ragged block of 1024
    assert_same(kernels.swiglu_gate, swiglu_reference, ab, tol=TOL[dtype])


def rope_qkv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, H: int,
                       H_kv: int) -> tuple[torch.Tensor, ...]:
    """model.py's steps: split q | k | v, split the heads, rotate q and k."""
    d = qkv.shape[-1] // (H + 2 * H_kv)
    q, k, v = (M._split_heads(t, n) for t, n in zip(qkv.split([H * d, H_kv * d, H_kv * d], -1),
                                                     (H, H_kv, H_kv)))
    return M.apply_rotary(q, cos, sin), M.apply_rotary(k, cos, sin), v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, T, H, H_kv, d", [(2, 37, 4, 2, 16), (1, 5, 3, 1, 48),
                                              (2, 64, 2, 2, 8)])
def test_rope_qkv_matches_split_and_apply_rotary(B, T, H, H_kv, d, dtype):
    """Forward and the gradient into q | k | v: T ragged against the 32-token block, grouped
    query heads, a head dim that is not a power of two (48: the kernel pads to 64)."""
    torch.manual_seed(0)
    cos, sin = (t.to(DEV) for t in M.RotaryEmbedding(10000.0, d, 64).cos_sin(None, T))
    qkv = torch.randn(B, T, (H + 2 * H_kv) * d, device=DEV).to(dtype)
    assert_same(lambda x: kernels.rope_qkv(x, cos, sin, H, H_kv),
                lambda x: rope_qkv_reference(x, cos, sin, H, H_kv), qkv, tol=TOL[dtype])
    q, k, v = kernels.rope_qkv(qkv, cos, sin, H, H_kv)
    assert q.shape == (B, H, T, d) and k.shape == v.shape == (B, H_kv, T, d)
    assert q.transpose(1, 2).is_contiguous()  # (B, T, H, d) underneath: attention merges heads


def test_rope_qkv_rejects_bad_input():
    cos, sin = M.RotaryEmbedding(10000.0, 16, 64).cos_sin(None, 5)
    qkv = torch.randn(2, 5, 4 * 16, device=DEV)
    cos, sin = cos.to(DEV), sin.to(DEV)
    with pytest.raises(ValueError, match=r"must be \(B, T, \(num_heads \+ 2 num_kv_heads\) d\)"):
        kernels.rope_qkv(qkv[..., :-2], cos, sin, 2, 1)  # 62 columns: not 4 heads of an even d
    with pytest.raises(ValueError, match=r"must be \(B, T"):
        kernels.rope_qkv(qkv[0], cos, sin, 2, 1)
    with pytest.raises(ValueError, match=r"the tables must be \(T, d/2\) = \(5, 8\)"):
        kernels.rope_qkv(qkv, cos[:4], sin[:4], 2, 1)
    with pytest.raises(ValueError, match="float64"):
        kernels.rope_qkv(qkv.double(), cos, sin, 2, 1)


def test_triton_modules_are_drop_in():
    """Same parameter names as model.py's modules, so state dicts load across."""
    torch.manual_seed(0)
    for fused, plain in ((kernels.TritonRMSNorm(24), M.RMSNorm(24)),
                         (kernels.TritonSwiGLU(24, 40), M.SwiGLU(24, 40)),
                         (kernels.TritonSelfAttention(24, 4, 2),
                          M.MultiHeadSelfAttention(24, 4, 2))):
        plain.load_state_dict({k: torch.randn_like(v) for k, v in plain.state_dict().items()})
        fused.load_state_dict(plain.state_dict())
        fused, plain, x = fused.to(DEV), plain.to(DEV), torch.randn(2, 5, 24, device=DEV)
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


def test_triton_rmsnorm_leaves_in_the_autocast_dtype_when_it_feeds_matmuls():
    """Under autocast a pre-norm block's norm writes the dtype its matmuls would cast it to (the
    same values and gradients as the cast after it); the residual sum stays in its own dtype."""
    torch.manual_seed(0)
    x, residual = torch.randn(2, 5, 24, device=DEV), torch.randn(2, 5, 24, device=DEV)
    norm, plain = kernels.TritonRMSNorm(24, feeds_matmul=True).to(DEV), M.RMSNorm(24).to(DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        for fn, ref in ((norm, lambda x: plain(x).bfloat16()),
                        (lambda x: norm.add_and_norm(x, residual),
                         lambda x: (plain(x + residual).bfloat16(), x + residual))):
            assert_same(fn, ref, x, tol=TOL[torch.bfloat16])
        normed, summed = norm.add_and_norm(x, residual)
        assert normed.dtype == torch.bfloat16 and summed.dtype == torch.float32
        norm.feeds_matmul = False
        assert norm(x).dtype == torch.float32
    configs = {"pre": dict(), "post": dict(norm_position="post"), "moe": dict(num_experts=2)}
    feeds = {name: _model(kernels="triton", **extra).layers[0].ln1.feeds_matmul
             for name, extra in configs.items()}
    assert feeds == {"pre": True, "post": False, "moe": False}


def reference_linear_cross_entropy(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)


@pytest.mark.parametrize("chunk_size", [16, 7, 1000])  # N = 50: several, ragged, one chunk
def test_fused_linear_cross_entropy_matches_full_logits(fused_in_kernels, chunk_size):
    torch.manual_seed(0)
    hidden, weight = torch.randn(50, 24, device=DEV), torch.randn(70, 24, device=DEV) * 0.5
    targets = torch.randint(70, (50,), device=DEV)
    targets[::3] = -100
    assert_same(lambda h, w: kernels.fused_linear_cross_entropy(h, w, targets,
                                                                chunk_size=chunk_size),
                lambda h, w: reference_linear_cross_entropy(h, w, targets), hidden, weight,
                tol=1e-5)


def test_fused_linear_cross_entropy_in_bfloat16_under_autocast():
    torch.manual_seed(0)
    hidden, weight = torch.randn(20, 16, device=DEV), torch.randn(70, 16, device=DEV)
    targets = torch.randint(70, (20,), device=DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        assert_same(lambda h, w: kernels.fused_linear_cross_entropy(h, w, targets, chunk_size=8),
                    lambda h, w: reference_linear_cross_entropy(h, w, targets), hidden, weight,
                    tol=2e-2)


def test_fused_linear_cross_entropy_all_ignored_is_zero_not_nan():
    hidden = torch.randn(6, 8, device=DEV, requires_grad=True)
    weight = torch.randn(30, 8, device=DEV, requires_grad=True)
    loss = kernels.fused_linear_cross_entropy(hidden, weight, torch.full((6,), -100, device=DEV),
                                         chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any()


def test_fused_linear_cross_entropy_without_gradients_skips_them(monkeypatch):
    """Validation runs under no_grad: the same loss, but the op makes no gradients (its two
    gradient outputs are empty), nor for inputs that do not require one."""
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, device=DEV, requires_grad=True)
    weight = torch.randn(30, 16, device=DEV, requires_grad=True)
    targets = torch.randint(30, (20,), device=DEV)
    op, outputs = kernels._linear_cross_entropy, []

    def keep_outputs(*args):
        outputs.append(op(*args))
        return outputs[-1]
    monkeypatch.setattr(kernels, "_linear_cross_entropy", keep_outputs)
    losses = [kernels.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=8)]
    with torch.no_grad():
        losses.append(kernels.fused_linear_cross_entropy(hidden, weight, targets, chunk_size=8))
    losses.append(kernels.fused_linear_cross_entropy(hidden.detach(), weight.detach(), targets,
                                                     chunk_size=8))
    assert [o[1].shape for o in outputs] == [hidden.shape, (0,), (0,)]
    assert [o[2].shape for o in outputs] == [weight.shape, (0,), (0,)]
    assert losses[0].requires_grad and not losses[1].requires_grad
    want = reference_linear_cross_entropy(hidden, weight, targets)
    for loss in losses:
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, losses[0], rtol=0, atol=0)


def test_fused_kernels_reject_bad_input(monkeypatch):
    x = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        kernels.rmsnorm_triton(x, torch.ones(7, device=DEV))
    with pytest.raises(ValueError, match="float64"):
        kernels.rmsnorm_triton(x.double(), torch.ones(8, device=DEV))
    with pytest.raises(ValueError, match="last dim of even size"):
        kernels.swiglu_gate(x[:, :7])
    with pytest.raises(ValueError, match=r"hidden \(N, D\) and weight \(V, D\)"):
        kernels.fused_linear_cross_entropy(x, x[:, :7],
                                           torch.zeros(4, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="targets must be integer ids"):
        kernels.fused_linear_cross_entropy(x, x, torch.zeros(4, device=DEV))
    if DEV == "cpu":  # a value check needs the data on the host
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\)"):
            kernels.fused_linear_cross_entropy(x, x, torch.tensor([0, 1, -100, 4]))
    monkeypatch.setattr(kernels, "INTERPRET", False)  # a CPU tensor, on a GPU machine or not
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kernels.swiglu_gate(x.cpu())
    with pytest.raises(ValueError, match="kernels must be one of"):
        ModelConfig(kernels="cuda")


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, context_length=16, d_model=32, num_layers=2,
                                 num_heads=2, d_ff=48), **overrides})


@pytest.mark.parametrize("overrides", [{}, {"norm_position": "post"}, {"tie_weights": True},
                                       {"num_kv_heads": 1, "num_layers": 3}])
def test_triton_kernels_model_equals_torch_model(fused_in_kernels, overrides):
    """Same weights (the state dict loads across), same logits, loss and gradients: with q | k | v
    as one matmul and rope_qkv, and each residual add inside the next norm."""
    torch.manual_seed(0)
    plain = TransformerLM(tiny_config(**overrides)).to(DEV)
    fused = TransformerLM(tiny_config(kernels="triton", **overrides)).to(DEV)
    fused.load_state_dict(plain.state_dict())
    assert isinstance(fused.layers[0].ln1, kernels.TritonRMSNorm)
    assert isinstance(fused.layers[0].ffn, kernels.TritonSwiGLU)
    assert isinstance(fused.layers[0].attn, kernels.TritonSelfAttention)
    x, y = torch.randint(64, (2, 16), device=DEV), torch.randint(64, (2, 16), device=DEV)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    losses = []
    for lm in (plain, fused):
        loss, _ = train.LossModel(lm)(x, y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    if DEV == "cuda" and not overrides:  # compiled, the custom ops in one graph: same loss
        compiled_loss, _ = torch.compile(train.LossModel(fused))(x, y)
        torch.testing.assert_close(compiled_loss, losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_py_runs_with_triton_kernels(fused_in_kernels, tmp_path):
    """`python train.py --kernels=triton`: the flag reaches ModelConfig and a short run trains."""
    cfg = train.parse_config(
        ["--kernels=triton", "--dataset=pydoc", "--max_text_mb=0.05", "--vocab_size=300",
         "--max_iters=2", "--batch_size=2", "--eval_interval=0", "--num_samples=0",
         f"--cache_dir={tmp_path / 'cache'}", f"--out_dir={tmp_path / 'out'}", f"--device={DEV}",
         "--compile=False", "--d_model=32", "--num_layers=1", "--num_heads=2", "--d_ff=48",
         "--context_length=16"],
        train.TrainConfig())
    assert cfg.model["kernels"] == "triton"
    result = train.train(cfg)
    assert isinstance(result["model"].layers[0].ln2, kernels.TritonRMSNorm)
    assert result["model"].config.kernels == "triton"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_on_gpu_at_real_shapes(fused_in_kernels, dtype):
    torch.manual_seed(0)
    x, r = (torch.randn(4097, 3000, device="cuda", dtype=dtype) for _ in range(2))
    weight = 1 + 0.1 * torch.randn(3000, device="cuda")
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    assert_same(kernels.rmsnorm_triton, reference_rmsnorm, x, weight, tol=tol)
    assert_same(kernels.fused_add_rmsnorm, lambda x, r, w: (reference_rmsnorm(x + r, w), x + r),
                x, r, weight, tol=tol)
    assert_same(kernels.swiglu_gate, swiglu_reference, torch.cat([x, r], dim=-1), tol=tol)
    cos, sin = (t.cuda() for t in M.RotaryEmbedding(10000.0, 64, 1024).cos_sin(None, 1000))
    qkv = torch.randn(8, 1000, (12 + 2 * 4) * 64, device="cuda", dtype=dtype)  # GPT-2 small, GQA
    assert_same(lambda t: kernels.rope_qkv(t, cos, sin, 12, 4),
                lambda t: rope_qkv_reference(t, cos, sin, 12, 4), qkv, tol=tol)
    hidden, head = torch.randn(2048, 768, device="cuda"), 0.05 * torch.randn(50304, 768).cuda()
    targets = torch.randint(50304, (2048,), device="cuda")
    targets[::5] = -100
    with torch.autocast("cuda", dtype=dtype, enabled=dtype == torch.bfloat16):
        assert_same(lambda h, w: kernels.fused_linear_cross_entropy(h, w, targets, chunk_size=1000),
                    lambda h, w: reference_linear_cross_entropy(h, w, targets), hidden, head,
                    tol=tol)


@needs_cuda
def test_triton_kernels_model_under_bf16_autocast_on_gpu(fused_in_kernels):
    """The training setting: bf16 autocast, float32 residual stream; losses and gradients agree
    to bf16 accuracy."""
    torch.manual_seed(0)
    config = dict(vocab_size=1000, context_length=128, d_model=256, num_heads=4, d_ff=688)
    plain = TransformerLM(tiny_config(**config)).cuda()
    fused = TransformerLM(tiny_config(kernels="triton", **config)).cuda()
    fused.load_state_dict(plain.state_dict())
    x, y = (torch.randint(1000, (4, 128), device="cuda") for _ in range(2))
    losses = []
    for lm in (plain, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = train.LossModel(lm)(x, y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=0)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert (q.grad - p.grad).norm() <= 3e-2 * p.grad.norm(), name


def fp8_rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as FP8 matmuls see it: scaled, rounded to the format, scaled back (float32)."""
    fmax = torch.finfo(dtype).max
    scale = fmax / t.detach().abs().amax().float()
    return (t.detach().float() * scale).clamp(-fmax, fmax).to(dtype).float() / scale


def assert_fp8_sums_close(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """got, summed from FP8 products, against want's float32 sums: equal on a CPU; a GPU's FP8
    tensor cores keep fewer bits in their sums (H200: 68 off in values up to ~1e6)."""
    if got.device.type == "cpu":
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=msg)
    assert (got - want).norm() < 1e-3 * want.norm(), msg


def test_fp8_linear_is_the_matmul_of_its_rounded_operands():
    """Forward x w^T with e4m3 operands, backward with the gradient in e5m2: the float32 matmuls
    of the rounded tensors (up to how the sums round), near the exact ones, any scale."""
    if DEV == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability 8.9+")
    torch.manual_seed(0)
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    # 2 x 30 rows: not a multiple of 16, as the weight gradient's inner size must be (padded)
    x = torch.randn(2, 30, 64, device=DEV, requires_grad=True)
    w = torch.randn(48, 64, device=DEV, requires_grad=True)
    y = kernels.fp8_linear(x, w)
    g = torch.randn(48, 30, 2, device=DEV).permute(2, 1, 0)  # not contiguous either
    y.backward(g)
    assert y.shape == (2, 30, 48) and y.dtype == x.grad.dtype == w.grad.dtype == torch.float32
    x16, w16 = x.detach()[0, :16].clone().requires_grad_(), w.detach().requires_grad_()
    kernels.FP8Linear.apply(x16, w16, torch.float32).backward(  # given a transposed gradient
        torch.randn(48, 16, device=DEV).t())
    # transposed inputs, one of them frozen, 21 rows and 16: the GPU's layout rules still hold
    # (the CPU path checks them too), and each gradient asked for comes back
    for n, x_grad, w_grad in ((21, True, False), (21, False, True), (16, True, True)):
        xt = torch.randn(64, n, device=DEV).t().requires_grad_(x_grad)
        wt = torch.randn(64, 48, device=DEV).t().requires_grad_(w_grad)
        kernels.fp8_linear(xt, wt).sum().backward()
        assert (xt.grad is not None, wt.grad is not None) == (x_grad, w_grad)
    assert kernels.fp8_linear(x.detach()[0, 0], w.detach()).shape == (48,)
    assert kernels.fp8_linear(x.detach()[:, :0], w.detach()).shape == (2, 0, 48)
    x2, g2 = x.detach().flatten(0, 1), g.flatten(0, 1)
    want = {"y": fp8_rounded(x2, e4) @ fp8_rounded(w, e4).T,
            "dx": fp8_rounded(g2, e5) @ fp8_rounded(w, e4),
            "dw": fp8_rounded(g2, e5).T @ fp8_rounded(x2, e4)}
    got = {"y": y.detach().flatten(0, 1), "dx": x.grad.flatten(0, 1), "dw": w.grad}
    exact = {"y": x2 @ w.detach().T, "dx": g2 @ w.detach(), "dw": g2.T @ x2}
    for name in want:
        assert_fp8_sums_close(got[name], want[name], name)
        error = ((got[name] - exact[name]).norm() / exact[name].norm()).item()
        assert 0.005 < error < (0.06 if name == "y" else 0.1), (name, error)  # 3 or 2 bits
    # Scaled per tensor: a power of two changes no rounded digit; zeros stay zeros, not NaN
    for factor in (2.0**40, 2.0**-30):
        torch.testing.assert_close(kernels.fp8_linear(x.detach() * factor, w.detach()),
                                   y.detach() * factor, rtol=1e-6, atol=0)
    assert not kernels.fp8_linear(torch.zeros(16, 64, device=DEV), w.detach()).any()
    for dtype in (torch.bfloat16, torch.float16):  # autocast's dtype out, as x @ w.T gives
        with torch.autocast(DEV, dtype=dtype):
            torch.testing.assert_close(kernels.fp8_linear(x.detach() * 1e3, w.detach()),
                                       (y.detach() * 1e3).to(dtype), rtol=1e-2, atol=0)
    a8, b8 = (kernels.to_fp8(t, e4)[0] for t in (x2, w.detach()))
    one, half = torch.ones((), device=DEV), torch.full((), 0.5, device=DEV)
    assert_fp8_sums_close(kernels.fp8_mm(a8, b8.t(), one, half, torch.float32),  # CPU: ours
                          torch._scaled_mm(a8.cpu(), b8.cpu().t(), one.cpu(), half.cpu(),
                                           out_dtype=torch.float32).to(DEV))
    with pytest.raises(ValueError, match="multiples of 16"):
        kernels.fp8_linear(x[..., :24], w[:, :24])
    if DEV == "cpu":  # a GPU's rules for the operands' layouts hold on the CPU too
        with pytest.raises(RuntimeError, match="row-major"):
            kernels.fp8_mm(a8, b8, one, half, torch.float32)
    for bad in (dict(d_ff=50), dict(d_model=40, num_heads=2), dict(num_experts=4)):
        with pytest.raises(ValueError, match="fp8 must be False unless"):
            ModelConfig(fp8=True, **bad)


def test_fp8_model_trains_in_fp8_and_evaluates_in_its_own_dtype(tmp_path):
    """fp8=True: the FFN's and the head's training matmuls in FP8 (near the plain model's loss
    and gradients), evaluation exactly the plain model; `train.py --fp8=True` trains."""
    if DEV == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability 8.9+")
    torch.manual_seed(0)
    plain = TransformerLM(tiny_config(vocab_size=100)).to(DEV)
    fp8 = TransformerLM(tiny_config(vocab_size=100, fp8=True)).to(DEV)
    fp8.load_state_dict(plain.state_dict())
    assert [n for n, m in fp8.named_modules() if isinstance(m, M.Linear) and m.fp8] == [
        f"layers.{i}.ffn.{w}" for i in range(2) for w in ("w1", "w2", "w3")]
    h, w1 = torch.randn(3, 32, device=DEV), fp8.layers[0].ffn.w1
    torch.testing.assert_close(w1(h), kernels.fp8_linear(h, w1.weight), rtol=0, atol=0)
    x, y = (torch.randint(100, (4, 16), device=DEV) for _ in range(2))
    assert not torch.equal(fp8(x, return_hidden=True), plain(x, return_hidden=True))
    for lm in (plain, fp8):
        loss, _ = train.LossModel(lm)(x, y)
        loss.backward()
    torch.testing.assert_close(loss, train.LossModel(plain)(x, y)[0], rtol=2e-2, atol=0)
    for (name, p), q in zip(plain.named_parameters(), fp8.parameters(), strict=True):
        assert (q.grad - p.grad).norm() <= 0.15 * p.grad.norm(), name
    head = F.pad(fp8.lm_head.weight, (0, 0, 0, 28))  # the head too, its rows padded to 128
    logits = kernels.fp8_linear(fp8(x, return_hidden=True), head)[..., :100]
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()),
                               rtol=1e-6, atol=0)
    plain.eval(), fp8.eval()
    torch.testing.assert_close(train.LossModel(fp8)(x, y)[0], train.LossModel(plain)(x, y)[0],
                               rtol=0, atol=0)
    val_loss = {}
    for fp8 in (False, True):
        cfg = train.parse_config(
            [f"--fp8={fp8}", "--dataset=pydoc", "--max_text_mb=0.05", "--vocab_size=300",
             "--max_iters=30", "--warmup_iters=3", "--batch_size=4", "--eval_interval=30",
             "--eval_iters=4", "--num_samples=0", "--lr=3e-3", f"--cache_dir={tmp_path / 'c'}",
             f"--out_dir={tmp_path / str(fp8)}", f"--device={DEV}", "--compile=False",
             "--d_model=32", "--num_layers=1", "--num_heads=2", "--d_ff=48",
             "--context_length=16"], train.TrainConfig())
        result = train.train(cfg)
        val_loss[fp8] = result["val_loss"]
    with pytest.raises(UsageError, match="--parallel must be torch, ddp or zero1 with --fp8=True"):
        train.check_config(dataclasses.replace(cfg, parallel="fsdp"))
    assert result["model"].config.fp8 and result["model"].layers[0].ffn.w1.fp8
    # it learned, as much as without FP8 (H200, bf16: 5.513 against 5.511; CPU 5.379, 5.376)
    assert val_loss[True] < math.log(300) - 0.1 and abs(val_loss[True] - val_loss[False]) < 0.02


from model import attention_mask, scaled_dot_product_attention  # noqa: E402


def flash_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d)) v in `dtype` (GQA by repeat_interleave; causal queries are the
    last T of the S positions, model.py's attention_mask) and the log-sum-exp of the scores."""
    q, k, v = (x.to(dtype) for x in (q, k, v))
    if q.dim() >= 3 and k.dim() == q.dim() and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    T, S = q.shape[-2], k.shape[-2]
    mask = attention_mask(T, S, S - T, None, q.device) if causal else None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v, scores.logsumexp(-1)


def run_flash(fn, q_shape: tuple, kv_shape: tuple, causal: bool, dtype: torch.dtype,
              seed: int = 0) -> tuple:
    """Output, L and the three gradients of fn and of the float64 reference on the same data
    (on the GPU where there is one, else in the interpreter)."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(s, dtype=dtype, device=DEV, requires_grad=True)
               for s in (q_shape, kv_shape, kv_shape))
    out = fn(q, k, v, causal)
    L = out.grad_fn.saved_tensors[-1]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_L = flash_reference(q, k, v, causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    return (out, L, *grads), (ref, ref_L, *ref_grads)


def assert_close_all(ours: tuple, ref: tuple, atol: float, rtol: float = 0.0) -> None:
    for name, a, b in zip(("out", "L", "dq", "dk", "dv"), ours, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=name)


# The PyTorch version ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_shape,kv_shape", [((2, 37, 16), (2, 37, 16)),
                                              ((2, 3, 20, 8), (2, 3, 45, 8))])
def test_flash_pytorch_matches_reference(q_shape, kv_shape, causal, dtype):
    """Uneven lengths (37 and 45 against tiles of 16), leading dims (b, seq, d) and (b, h, seq,
    d), fewer queries than keys; L is the log-sum-exp, (..., n_queries), float32 for float32."""
    ours, ref = run_flash(kernels.FlashAttentionPytorch.apply, q_shape, kv_shape, causal, dtype)
    assert ours[0].dtype == dtype and ours[1].shape == q_shape[:-1]
    assert ours[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_all(ours, ref, atol=1e-12 if dtype == torch.float64 else 2e-5)


def test_flash_pytorch_gradcheck():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 18, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    assert torch.autograd.gradcheck(kernels.FlashAttentionPytorch.apply, (q, k, v, True),
                                    fast_mode=True)


def test_flash_pytorch_causal_needs_enough_keys():
    q, k = torch.randn(1, 20, 16), torch.randn(1, 10, 16)
    with pytest.raises(ValueError, match="20 > 10"):
        kernels.FlashAttentionPytorch.apply(q, k, k, True)


# The Triton kernels (interpreted on a CPU) --------------------------------------------------------
@pytest.mark.parametrize("B,H,H_kv,T,S,d,causal", [
    (1, 2, 2, 37, 37, 16, True),  # uneven length, several query and key tiles
    (1, 2, 2, 21, 50, 32, False),  # fewer queries than keys, ragged on both sides
    (1, 4, 2, 24, 40, 16, True),  # GQA, causal with the queries last
    (1, 4, 1, 33, 33, 64, False),  # multi-query
    (1, 2, 2, 20, 20, 48, True),  # head dim padded to 64
])
def test_flash_triton_matches_reference(B, H, H_kv, T, S, d, causal):
    ours, ref = run_flash(kernels.flash_attention, (B, H, T, d), (B, H_kv, S, d),
                          causal, torch.float32)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert_close_all(ours, ref, atol=2e-5)


def test_flash_triton_float16():
    """float16 in the interpreter; bfloat16 only on the GPU (the interpreter's bfloat16 dot is
    wrong), in test_flash_triton_cuda_matches_reference."""
    ours, ref = run_flash(kernels.flash_attention, (1, 2, 24, 16), (1, 2, 24, 16), True,
                          torch.float16)
    assert ours[0].dtype == ours[2].dtype == torch.float16
    assert_close_all(ours, ref, atol=1e-2, rtol=1e-2)


def test_flash_triton_strided_inputs():
    """model.py's layout: q, k, v are transposed views of (B, T, H, d); the output is laid out
    so too. A strided last dim is copied, not misread, also where the tensor is dense (x.mT)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 21, 2, 16, device=DEV, requires_grad=True) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out = kernels.flash_attention(qt, kt, vt, True)
    assert out.transpose(1, 2).is_contiguous()
    ref, _ = flash_reference(qt, kt, vt, True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    wide = torch.randn(1, 2, 21, 32, device=DEV)[..., ::2]  # last-dim stride 2
    transposed = torch.randn(1, 2, 16, 21, device=DEV).mT  # dense; the last dim's stride is 21
    for x in (wide, transposed):
        torch.testing.assert_close(kernels.flash_attention(x, x, x, False).double(),
                                   flash_reference(x, x, x, False)[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("change,match", [
    (dict(q=torch.zeros(1, 2, 8, 16, dtype=torch.float64)), "dtype torch.float64; expected"),
    (dict(k=torch.zeros(1, 2, 8, 16, dtype=torch.int32)), "dtype torch.int32; expected"),
    (dict(v=torch.zeros(1, 2, 8, 16, dtype=torch.float16)), "dtypes differ"),
    (dict(k=torch.zeros(1, 2, 8, 16, device="meta")), "devices differ"),
    (dict(q=torch.zeros(1, 2, 8, 8), k=torch.zeros(1, 2, 8, 8), v=torch.zeros(1, 2, 8, 8)),
     "head dim 8"),
    (dict(q=torch.zeros(1, 3, 8, 16)), "3 query heads is not a multiple of 2"),
    (dict(v=torch.zeros(1, 2, 9, 16)), "do not fit"),
    (dict(q=torch.zeros(8, 16)), r"q must be a tensor \(..., heads, seq, d\), got \(8, 16\)"),
    (dict(q=torch.zeros(1, 2, 9, 16), causal=True), "9 > 8"),
])
def test_flash_triton_bad_inputs_name_the_problem(change, match):
    args = dict(q=torch.zeros(1, 2, 8, 16), k=torch.zeros(1, 2, 8, 16),
                v=torch.zeros(1, 2, 8, 16), causal=False)
    args.update(change)
    q, k, v = (args[n].to(DEV) if args[n].device.type == "cpu" else args[n] for n in "qkv")
    with pytest.raises(ValueError, match=match):
        kernels.flash_attention(q, k, v, args["causal"])


def test_flash_triton_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    x = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kernels.flash_attention(x, x, x)


def test_bench_attention_rows():
    rows = kernels.bench_attention(kernels.AttentionConfig(
        impls="manual,triton", head_dims="16", seq_lens="64", dtypes="float32", modes="fwd",
        heads=2))
    assert [(r["impl"], r["status"]) for r in rows] == [("manual", "ok"), ("triton", "ok")]
    assert all(r["ms"] > 0 and r["tflops"] > 0 and r["gpu_ms"] is None for r in rows)
    with pytest.raises(UsageError, match="--impls=xformers: expected one or more of manual"):
        kernels.bench_attention(kernels.AttentionConfig(impls="xformers"))


# On a GPU: realistic shapes in bfloat16, against the same reference -------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("B,H,H_kv,T,S,d,causal", [
    (2, 8, 8, 1024, 1024, 64, True), (2, 8, 8, 1024, 1024, 64, False),
    (2, 8, 2, 2048, 2048, 128, True), (1, 4, 4, 1000, 1000, 128, True),
    (1, 4, 1, 700, 1000, 96, True), (1, 4, 4, 1000, 1500, 64, False),
])
def test_flash_triton_cuda_matches_reference(B, H, H_kv, T, S, d, causal):
    """bfloat16 against the float32 reference, within twice the error of the float32 reference
    computed from bfloat16-rounded inputs with a bfloat16 softmax (torch's own SDPA math path)."""
    torch.manual_seed(0)
    q = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(B, H_kv, S, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = kernels.flash_attention(q, k, v, causal)
    assert out.dtype == torch.bfloat16
    L = out.grad_fn.saved_tensors[-1]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_L = flash_reference(q, k, v, causal, torch.float32)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    mask = attention_mask(T, S, S - T, None, q.device) if causal else None
    kv = [x.detach().repeat_interleave(H // H_kv, 1) for x in (k, v)]
    manual = scaled_dot_product_attention(q.detach(), *kv, mask)  # bf16 matmuls: the yardstick
    yardstick = (manual.float() - ref).abs().max().item()
    assert (out.float() - ref).abs().max().item() <= 2 * yardstick + 1e-3
    torch.testing.assert_close(L, ref_L, atol=2e-2, rtol=0)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        err, size = (a.float() - b).abs().max().item(), b.abs().max().item()
        assert err <= 2e-2 * max(size, 1.0), f"{name}: max error {err} (max |grad| {size})"


@cuda
def test_flash_triton_cuda_float32_and_float16():
    # float32 dots (ours and the reference's) are true fp32 only at "highest" precision, which an
    # earlier test may have changed (train.setup sets "high": TF32)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        _flash_float32_and_float16()
    finally:
        torch.set_float32_matmul_precision(precision)


def _flash_float32_and_float16() -> None:
    for dtype, atol in ((torch.float32, 2e-3), (torch.float16, 1e-2)):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 4, 300, 64, device="cuda", dtype=dtype, requires_grad=True)
                   for _ in range(3))
        out = kernels.flash_attention(q, k, v, True)
        ref, _ = flash_reference(q, k, v, True, torch.float32)
        torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
        dout = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), dout),
                        torch.autograd.grad(ref, (q, k, v), dout.float())):
            torch.testing.assert_close(a.float(), b.float(), atol=5 * atol, rtol=0)


@cuda
def test_flash_triton_cuda_rejects_cpu_tensors():
    if kernels.INTERPRET:
        pytest.skip("the interpreter is on")
    x = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kernels.flash_attention(x, x, x)


@cuda
def test_bench_attention_cuda_rows():
    rows = kernels.bench_attention(kernels.AttentionConfig(
        quick=False, impls="manual,triton,sdpa-flash", head_dims="64", seq_lens="1024",
        dtypes="bfloat16,float32", modes="fwd+bwd", heads=4))
    status = {(r["impl"], r["dtype"]): r["status"] for r in rows}
    assert status[("sdpa-flash", "float32")] == "n/a"
    assert status[("triton", "bfloat16")] == status[("triton", "float32")] == "ok"
    ours = next(r for r in rows if r["impl"] == "triton" and r["dtype"] == "bfloat16")
    assert ours["vs_flash"] > 0 and ours["peak_gb"] > 0 and 0 < ours["gpu_ms"] < 10 * ours["ms"]


# (to merge into test_all.py after the kernels.py tests; run alone: python -m pytest -q THIS_FILE)
from collections.abc import Callable  # noqa: E402


# On a CPU, aot_eager: dynamo + AOTAutograd, the code that meets our fake and autograd
# registrations, without inductor's C++ builds; on a GPU, inductor.
BACKEND = "inductor" if DEV == "cuda" else "aot_eager"


CASES = {  # name: (function of tensors, its inputs)
    "rmsnorm": (kernels.rmsnorm_triton,
                lambda: (torch.randn(2, 5, 24) * 3, 1 + 0.1 * torch.randn(24))),
    "add+rmsnorm": (kernels.fused_add_rmsnorm,
                    lambda: (torch.randn(2, 5, 24), torch.randn(2, 5, 24), torch.randn(24))),
    "swiglu": (kernels.swiglu_gate, lambda: (torch.randn(3, 80),)),
    "linear+CE": (lambda h, w, t: kernels.fused_linear_cross_entropy(h, w, t, chunk_size=7),
                  lambda: (torch.randn(20, 16), torch.randn(30, 16) * 0.5,
                           torch.tensor([3, -100] * 10))),
    "flash": (lambda q, k, v: kernels.flash_attention(q, k, v, True),
              lambda: (torch.randn(1, 4, 20, 16), torch.randn(1, 2, 20, 16),
                       torch.randn(1, 2, 20, 16))),  # GQA
    "flash, model.py's layout": (  # transposed views in, a transposed output
        lambda q, k, v: kernels.flash_attention(*(x.transpose(1, 2) for x in (q, k, v)), True),
        lambda: tuple(torch.randn(1, 20, 2, 16) for _ in range(3))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_compile_fullgraph_and_equal_eager(name):
    """fullgraph=True fails on any graph break: each kernel is one custom op in the graph."""
    torch.manual_seed(0)
    fn, make_inputs = CASES[name]
    inputs = [t.to(DEV) for t in make_inputs()]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=BACKEND)
    for got, want in zip(outputs_and_grads(compiled, *inputs), outputs_and_grads(fn, *inputs),
                         strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_compiles_under_autocast():
    """The matmul dtype comes from autocast, read while tracing: bf16 logits, float32 loss."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(20, 16, device=DEV), torch.randn(30, 16, device=DEV)
    targets = torch.randint(30, (20,), device=DEV)

    def loss(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.autocast(DEV, dtype=torch.bfloat16):
            return kernels.fused_linear_cross_entropy(h, w, targets, chunk_size=8)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=BACKEND)
    want = F.cross_entropy((hidden.bfloat16() @ weight.bfloat16().T).float(), targets)
    for fn in (loss, compiled):
        got = outputs_and_grads(fn, hidden, weight)
        assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
        torch.testing.assert_close(got[0], want, rtol=2e-2, atol=2e-2)


def test_triton_model_has_no_graph_breaks_and_compiles_to_eager():
    """A tiny TransformerLM with kernels="triton", attn_impl="triton" and train.py's LossModel
    (the fused head + loss): one graph, and the compiled loss and gradients equal eager."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, context_length=16, d_model=32, num_layers=1, num_heads=2,
                         num_kv_heads=1, d_ff=48, kernels="triton", attn_impl="triton")
    lm = TransformerLM(config).to(DEV)
    x, y = (torch.randint(64, (2, 16), device=DEV) for _ in range(2))
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return torch._dynamo.lookup_backend(BACKEND)(gm, example_inputs)
    torch._dynamo.reset()
    results = []
    for step_model in (train.LossModel(lm), torch.compile(train.LossModel(lm), fullgraph=True,
                                                          backend=backend)):
        lm.zero_grad(set_to_none=True)
        loss, aux = step_model(x, y)
        (loss + aux).backward()
        results.append([loss.detach(), *(p.grad.clone() for p in lm.parameters())])
    ops = {str(node.target) for node in graphs[0].graph.nodes}
    assert len(graphs) == 1 and {f"cs336.{name}.default" for name in (
        "rmsnorm_fwd", "swiglu_fwd", "rope_qkv_fwd", "flash_attention_fwd",
        "linear_cross_entropy")} <= ops, ops
    for got, want in zip(*results, strict=True):  # inductor sums in another order than eager
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def op_cases() -> list[tuple]:
    torch.manual_seed(0)
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    q, kv = torch.randn(1, 2, 8, 16), torch.randn(1, 1, 8, 16)
    x, r, w, q, kv = (t.to(DEV) for t in (x, r, w, q, kv))  # the kernels run where the GPU is
    _, _, rstd = kernels._rmsnorm_fwd(x, w, None, 1e-5, None)
    O, L = kernels._flash_fwd(q, kv, kv, True)
    ab, qkv = torch.randn(2, 16), torch.randn(2, 5, 64)  # q | k | v: 2 + 2 x 1 heads of 16
    dq, dkv = torch.randn(2, 5, 2, 16), torch.randn(2, 5, 1, 16)
    cos, sin = M.RotaryEmbedding(10000.0, 16, 8).cos_sin(None, 5)
    return [(kernels._rmsnorm_fwd, (x, w, None, 1e-5, None)),
            (kernels._rmsnorm_fwd, (x, w, r, 1e-5, None)),
            (kernels._rmsnorm_fwd, (x, w, r, 1e-5, torch.float16)),
            (kernels._rmsnorm_bwd, (r, x, w, rstd, None)),
            (kernels._rmsnorm_bwd, (r, x, w, rstd, torch.randn(3, 8))),
            (kernels._swiglu_fwd, (ab,)), (kernels._swiglu_bwd, (torch.randn(2, 8), ab)),
            *((kernels._linear_cross_entropy, (torch.randn(6, 8), torch.randn(10, 8),
                                               torch.tensor([1, 2, -100, 4, 5, 9]), -100, 4,
                                               torch.float32, grads)) for grads in (True, False)),
            (kernels._flash_fwd, (q, kv, kv, True)),
            (kernels._flash_bwd, (torch.randn_like(O), q, kv, kv, O, L, True)),
            (kernels._rope_qkv_fwd, (qkv, cos, sin, 2, 1)),
            (kernels._rope_qkv_bwd, (dq, dkv, torch.randn_like(dkv), cos, sin))]


@pytest.mark.parametrize("index", range(13))
def test_custom_ops_pass_opcheck(index):
    """torch.library.opcheck: the schema, the fake against the real op, the autograd
    registration, and tracing with dynamic shapes (what compile relies on)."""
    op, args = op_cases()[index]
    differentiable = op in (kernels._rmsnorm_fwd, kernels._swiglu_fwd, kernels._flash_fwd,
                            kernels._rope_qkv_fwd) or (
        op is kernels._linear_cross_entropy and args[-1])  # grads=False: only for no gradient
    args = [a.to(DEV).requires_grad_(a.is_floating_point() and differentiable)
            if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(op, args)


def test_kernels_py_as_a_script_is_the_module_model_py_imports():
    """`python kernels.py` runs as __main__; model.py's `import kernels` must get that module, not
    run kernels.py a second time (its Triton kernels compiled twice, its custom ops registered
    twice)."""
    import subprocess
    import sys
    code = ("import runpy, sys; sys.argv = ['kernels.py', '-h']; "
            "runpy.run_path('kernels.py', run_name='__main__'); import model; "
            "assert model.triton_kernels().__name__ == '__main__'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=M.__file__.rsplit("/", 1)[0])
    assert result.returncode == 0, result.stderr[-2000:]


# =================================================================================================
# ddp.py
# =================================================================================================

import ddp  # noqa: E402

# One process group (2 gloo ranks, spawned once per session) runs every check below and saves what
# it saw; the tests compare that with one process training on the whole batch.
_DP_WRAPPERS = {"naive": ddp.DDPNaive, "flat": ddp.DDPFlat,
                "individual": ddp.DDPIndividualParameters,
                "bucket_smaller_than_one_param": lambda m: ddp.DDPBucketed(m, 1e-6),
                "bucket_larger_than_all": lambda m: ddp.DDPBucketed(m, 100.0),
                "bucket_some": lambda m: ddp.DDPBucketed(m, 0.004)}
_DP_OPTIMIZERS = {"sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
                  "adamw": lambda params: AdamW(params, lr=1e-2, weight_decay=0.1)}
_DP_STEPS = 3


def _dp_model(seed: int, **overrides) -> TransformerLM:
    """Tied embedding and head, and a frozen (and perturbed, so seeds differ) norm gain."""
    torch.manual_seed(seed)
    model = TransformerLM(ModelConfig(vocab_size=32, context_length=8, d_model=16, num_layers=2,
                                      num_heads=2, d_ff=32, tie_weights=True, **overrides))
    frozen = model.layers[0].ln1.weight
    with torch.no_grad():
        frozen.add_(0.1 * torch.randn_like(frozen))
    frozen.requires_grad_(False)
    return model


def _dp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 32, (4, 8), generator=g), torch.randint(0, 32, (4, 8), generator=g)


def _dp_train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              sync=lambda: None) -> dict:
    for _ in range(_DP_STEPS):
        optimizer.zero_grad()
        F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).backward()
        sync()
        optimizer.step()
    if isinstance(model, ddp.FSDP):
        return model.gather_full_params()
    return {k: v.clone() for k, v in getattr(model, "module", model).state_dict().items()}


def _dp_groups(model: nn.Module) -> tuple[list, dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return params[:4], {"params": params[4:], "lr": 5e-3, "weight_decay": 0.0}


def _dp_worker(rank: int, world_size: int, out: str) -> None:
    x, y = _dp_batch()
    half = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    start = _dp_model(0).state_dict()
    seen = {"collectives": ddp.show_collectives(rank, world_size)}
    for wrapper_name, wrap in _DP_WRAPPERS.items():
        for optimizer_name, make_optimizer in _DP_OPTIMIZERS.items():
            model = wrap(_dp_model(seed=rank))  # rank 1 starts elsewhere: construction fixes it
            seen[wrapper_name, optimizer_name, "start"] = all(
                torch.equal(v, start[k]) for k, v in model.module.state_dict().items())
            seen[wrapper_name, optimizer_name] = _dp_train(
                model, make_optimizer(model.parameters()), x[half], y[half],
                model.finish_gradient_synchronization)
            if isinstance(model, ddp.DDPBucketed):
                seen[wrapper_name, "buckets"] = [len(bucket) for bucket in model.buckets]
    model = ddp.DDPFlat(_dp_model(seed=rank))
    first, second = _dp_groups(model)
    optimizer = ddp.ShardedOptimizer(first, AdamW, lr=1e-2, weight_decay=0.1)
    optimizer.add_param_group(second)
    seen["sharded_owned"] = [len(params) for params in optimizer.owned]
    seen["sharded"] = _dp_train(model, optimizer, x[half], y[half],
                                model.finish_gradient_synchronization)
    try:
        ddp.DDPNaive(_dp_model(0))(x[: 1 + rank])
    except ValueError as e:
        seen["batch_error"] = str(e)
    for dtype in (None, torch.bfloat16):
        model = ddp.FSDP(_dp_model(seed=rank), compute_dtype=dtype)
        seen["fsdp", dtype] = _dp_train(model, AdamW(model.parameters(), lr=1e-2,
                                                     weight_decay=0.1), x[half], y[half],
                                        model.finish_gradient_synchronization)
        seen["fsdp_next"] = model._next  # the prefetch order the forwards taught it
    torch.manual_seed(0)  # 15 weights: shards of 8, the last padded with a zero
    model = ddp.FSDP(M.Linear(3, 5))
    seen["fsdp_odd_shard"] = model.shards[0].numel()
    seen["fsdp_odd"] = _dp_train(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 *_fsdp_odd_batch(half))
    seen.update(_tp_and_pp(x, y))
    ddp.bench_all_reduce(rank, world_size, [0.001], 1, "gloo")
    torch.save(seen, Path(out, f"rank{rank}.pt"))


def _fsdp_odd_batch(rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 3, generator=g)  # (B, T, d_in): cross-entropy over 5 classes
    return x[rows], torch.randint(0, 5, (4, 2), generator=g)[rows]


def _tp_grads(model: nn.Module) -> dict:
    """Every gradient under the unsplit model's name, slices of split weights gathered."""
    grads, seen = {}, set()
    for name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tied weight is named once, as named_parameters() does
                continue
            seen.add(id(p))
            grad = p.grad
            if isinstance(module, (ddp.ColumnParallelLinear, ddp.RowParallelLinear)):
                parts = [torch.empty_like(grad) for _ in range(2)]
                torch.distributed.all_gather(parts, grad)
                grad = torch.cat(parts, dim=int(isinstance(module, ddp.RowParallelLinear)))
            if grad is not None:
                grads[f"{name}.{p_name}".replace(".block.", ".")] = grad
    return grads


def _pp_model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(vocab_size=32, context_length=8, d_model=16, num_layers=4,
                                     num_heads=2, d_ff=32))


def _tp_and_pp(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Tensor and sequence parallel (both ranks see the whole batch), then a 2-stage GPipe
    pipeline over 4 micro-batches."""
    seen = {}
    for sequence_parallel in (False, True):
        model = ddp.tensor_parallel(_dp_model(0), sequence_parallel)
        logits = model(x)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        if sequence_parallel:
            ddp.sync_norm_grads(model)
        seen["tp", sequence_parallel] = logits.detach(), _tp_grads(model)
    # kernels.py's modules split too: the blocks add in place (no deferred adds), q | k | v
    # projected by the column-parallel layers one by one, then rope_qkv on this rank's heads
    seen["tp_triton"] = ddp.tensor_parallel(_dp_model(0, kernels="triton"))(x).detach()
    try:
        ddp.tensor_parallel(TransformerLM(ModelConfig(vocab_size=32, d_model=16, num_heads=1)))
    except ValueError as e:
        seen["tp_error"] = str(e)
    model = _pp_model()
    stage = ddp.PipelineStage(model)
    loss, idle = ddp.gpipe_step(stage, x, y, num_microbatches=4)
    mine = {id(p) for p in stage.parameters()}
    seen["pp"] = loss, idle, {name: p.grad for name, p in model.named_parameters()
                              if id(p) in mine}
    return seen


@pytest.fixture(scope="session")
def _dp_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dp")
    ddp.spawn(_dp_worker, 2, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_collectives_demo_all_reduce_is_reduce_scatter_then_all_gather(_dp_ranks):
    lines = _dp_ranks[0]["collectives"]
    assert lines[-1] == "all-reduce == reduce-scatter + all-gather: True"
    at = lines.index("all-reduce     the sum on every rank")  # ranks hold [0, 1] and [10, 11]
    assert lines[at + 1:at + 3] == ["  rank 0: [10, 12]", "  rank 1: [10, 12]"]
    assert _dp_ranks[1]["collectives"] == []  # only rank 0 reports


@pytest.mark.parametrize("optimizer_name", list(_DP_OPTIMIZERS))
@pytest.mark.parametrize("wrapper_name", list(_DP_WRAPPERS))
def test_data_parallel_equals_one_process_on_the_full_batch(_dp_ranks, wrapper_name,
                                                            optimizer_name):
    key = (wrapper_name, optimizer_name)
    assert all(r[(*key, "start")] for r in _dp_ranks)  # both ranks begin from rank 0's weights
    one = _dp_model(0)
    expected = _dp_train(one, _DP_OPTIMIZERS[optimizer_name](one.parameters()), *_dp_batch())
    r0, r1 = (r[key] for r in _dp_ranks)
    for name, value in expected.items():
        assert torch.equal(r0[name], r1[name]), name  # replicas stay identical
        torch.testing.assert_close(r0[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(r0["lm_head.weight"], r0["token_embeddings.weight"])  # still tied
    frozen = "layers.0.ln1.weight"
    assert torch.equal(r0[frozen], _dp_model(0).state_dict()[frozen])  # rank 0's, never moved
    assert not torch.equal(r0[frozen], _dp_model(1).state_dict()[frozen])


def test_buckets_hold_parameters_in_reverse_order_up_to_the_size(_dp_ranks):
    trainable = sum(p.requires_grad for p in _dp_model(0).parameters())  # the tied matrix once
    buckets = {name: _dp_ranks[0][name, "buckets"] for name in _DP_WRAPPERS if "bucket" in name}
    assert buckets["bucket_smaller_than_one_param"] == [1] * trainable
    assert buckets["bucket_larger_than_all"] == [trainable]
    # 0.004 MB = 4,194 bytes, filled from the end: [ln_final 64, w3, w2 (2,048 each)], [w1, ln2,
    # output_proj, v_proj (1,024 each)], [k, q, ln1, layer 0's w3], [w2, w1, ln2], [the four
    # attention matrices], [token_embeddings]; layer 0's ln1 is frozen and absent
    assert buckets["bucket_some"] == [3, 4, 4, 3, 4, 1] and trainable == 19


def test_sharded_optimizer_with_adamw_equals_adamw(_dp_ranks):
    one = _dp_model(0)
    first, second = _dp_groups(one)
    optimizer = AdamW(first, lr=1e-2, weight_decay=0.1)
    optimizer.add_param_group(second)
    expected = _dp_train(one, optimizer, *_dp_batch())
    r0, r1 = (r["sharded"] for r in _dp_ranks)
    for name, value in expected.items():
        assert torch.equal(r0[name], r1[name]), name
        torch.testing.assert_close(r0[name], value, rtol=1e-5, atol=1e-6, msg=name)
    owned = _dp_ranks[0]["sharded_owned"]
    assert sum(owned) == len(first) + len(second["params"]) and min(owned) > 0


def test_fsdp_equals_one_process_and_gathers_the_full_state_dict(_dp_ranks):
    one = _dp_model(0)
    start = {k: v.clone() for k, v in one.state_dict().items()}
    expected = _dp_train(one, AdamW(one.parameters(), lr=1e-2, weight_decay=0.1), *_dp_batch())
    fp32, bf16 = (_dp_ranks[0]["fsdp", dtype] for dtype in (None, torch.bfloat16))
    assert list(fp32) == list(bf16) and sorted(fp32) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(fp32[name], _dp_ranks[1]["fsdp", None][name]), name
        torch.testing.assert_close(fp32[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(fp32["lm_head.weight"], fp32["token_embeddings.weight"])  # still tied
    # 16 sharded layers in forward order; in block 0, w1 (layer 5) is followed by w3 (7), then w2
    assert len(_dp_ranks[0]["fsdp_next"]) == 15
    assert _dp_ranks[0]["fsdp_next"][5] == 7 and _dp_ranks[0]["fsdp_next"][7] == 6
    # bf16 compute, fp32 master weights: the update differs from fp32's by rounding only. Adam's
    # first steps are near sign(g), so small gradients that bf16 rounds across 0 move a lot: 1-11%
    # of the update's norm on an AMD EPYC (earlier CI machines stayed under 10%); wrong: ~100%
    for name, value in expected.items():
        if not torch.equal(value, start[name]):
            change, change_bf16 = value - start[name], bf16[name] - start[name]
            assert (change_bf16 - change).norm() < 0.2 * change.norm(), name
    torch.manual_seed(0)
    linear = M.Linear(3, 5)
    odd = _dp_train(linear, torch.optim.SGD(linear.parameters(), lr=0.1), *_fsdp_odd_batch())
    assert _dp_ranks[0]["fsdp_odd_shard"] == 8
    torch.testing.assert_close(_dp_ranks[1]["fsdp_odd"]["weight"], odd["weight"])


def _tp_reference() -> tuple[torch.Tensor, dict]:
    model = _dp_model(0)
    x, y = _dp_batch()
    logits = model(x)
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_forward_and_backward_equal_the_unsplit_model(_dp_ranks,
                                                                      sequence_parallel):
    logits, grads = _tp_reference()
    for r in _dp_ranks:
        tp_logits, tp_grads = r["tp", sequence_parallel]
        torch.testing.assert_close(tp_logits, logits, rtol=1e-5, atol=1e-5)
        assert sorted(tp_grads) == sorted(grads)
        for name, grad in grads.items():
            torch.testing.assert_close(tp_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # sequence parallelism moves the same numbers differently: TP's logits, bit for bit
    assert torch.equal(_dp_ranks[0]["tp", True][0], _dp_ranks[0]["tp", False][0])
    torch.testing.assert_close(_dp_ranks[0]["tp_triton"], logits, rtol=1e-5, atol=1e-5)
    assert _dp_ranks[0]["tp_error"] == "1 key-value heads do not divide into 2 ranks"


def test_pipeline_gpipe_equals_the_unsplit_model(_dp_ranks):
    model = _pp_model()
    x, y = _dp_batch()
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    (loss0, idle0, grads0), (loss1, idle1, grads1) = (r["pp"] for r in _dp_ranks)
    assert loss0 is None and loss1 == pytest.approx(loss.item(), rel=1e-6)
    assert "token_embeddings.weight" in grads0 and "lm_head.weight" in grads1
    assert sorted({**grads0, **grads1}) == sorted(n for n, _ in model.named_parameters())
    for name, grad in {**grads0, **grads1}.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad,
                                   rtol=1e-5, atol=1e-6, msg=name)
    assert 0 <= idle0 <= 1 and 0 <= idle1 <= 1
    assert ddp.bubble_fraction(2, 4) == 1 / 5 and ddp.bubble_fraction(4, 8) == 3 / 11
    assert ddp.bubble_fraction(1, 8) == 0


def test_data_parallel_bad_input_is_a_clear_error(_dp_ranks):
    for r in _dp_ranks:  # every rank raises, so none is left waiting in a collective
        assert r["batch_error"] == ("batch sizes differ across ranks (from 1 to 2): give every "
                                    "rank the same batch size")
    with pytest.raises(RuntimeError, match="DDPBucketed needs an initialised process group"):
        ddp.DDPBucketed(nn.Linear(2, 2), 25)
    with pytest.raises(RuntimeError, match="ShardedOptimizer needs an initialised process group"):
        ddp.ShardedOptimizer(nn.Linear(2, 2).parameters(), AdamW)


def test_accounting_known_answers(capsys):
    # 1,000 parameters on 4 GPUs: 16 bytes each replicated = 16,000; ZeRO-1 keeps 8 + 8/4 = 10,
    # ZeRO-2 4 + 12/4 = 7, ZeRO-3 16/4 = 4 bytes a parameter. A ring all-reduce of 4,000
    # gradient bytes sends 2 * 3/4 * 4,000 = 6,000; FSDP's two all-gathers and a reduce-scatter
    # 9,000. TP, 2 layers of 10 tokens x 8 wide: 2 * 4 * 2 * 3/4 * 10 * 8 * 4 = 3,840.
    rows = ddp.accounting(1000, 4, tokens=10, d_model=8, num_layers=2)
    assert {k: v["memory"] for k, v in rows.items()} == {
        "DDP": 16000, "ZeRO-1": 10000, "ZeRO-2": 7000, "ZeRO-3/FSDP": 4000, "TP": 4000}
    assert {k: v["traffic"] for k, v in rows.items()} == {
        "DDP": 6000, "ZeRO-1": 6000, "ZeRO-2": 6000, "ZeRO-3/FSDP": 9000, "TP": 3840}
    # The course's exercise: 126 blocks x 2 x 16,384 x 53,248 FFN weights = 219,848,638,464
    # parameters, x 16 bytes = 3,517.6 GB: ceil(3,517.6 / 80) = 44 GPUs with FSDP; DDP never.
    params = M.count_params(ModelConfig(**ddp.EXAMPLES["course"]))["ffn"]
    assert params == 126 * 2 * 16384 * 53248 == 219_848_638_464
    assert ddp.gpus_needed(params, "ZeRO-3/FSDP", 80e9) == 44
    assert ddp.gpus_needed(params, "DDP", 80e9) is None
    assert ddp.gpus_needed(1000, "ZeRO-1", 12_000) == 2  # 8,000 replicated + 8,000 / 2
    ddp.main(["accounting", "--example=course"])
    out = capsys.readouterr().out
    assert "219,848,638,464 parameters" in out and "3,517.6 GB" in out
    assert "FSDP: 44 GPUs of 80 GB hold the states (fewer cannot), 79.9 GB each" in out
    ddp.main(["accounting", "--preset=xl", "--num_gpus=2"])
    out = capsys.readouterr().out
    assert "xl: 1,998,235,200 parameters" in out and "bucketed DDP" in out
    # 4 GB of gradients at 200 GB/s with 50 us a call: sqrt(s / (w o)) = 20 buckets of 200 MB,
    # 20 x 50 us of calls + the last bucket's 1 ms transfer
    n_b, overhead = ddp.best_buckets(4e9, 200e9, 50e-6)
    assert n_b == 20 and overhead == pytest.approx(2e-3)
    assert ddp.best_buckets(4e9, 200e9, 50e-6)[1] < min(
        k * 50e-6 + 4e9 / (k * 200e9) for k in (1, 10, 19, 21, 40, 400))
    with pytest.raises(UsageError, match="unknown --example 'nope'"):
        ddp.main(["accounting", "--example=nope"])
    with pytest.raises(UsageError, match="did you mean --num_gpus"):
        ddp.main(["accounting", "--num_gpu=3"])


# A constant learning rate (no warm-up, min_lr = lr): the first 3 steps of a 5-step run are a
# 3-step run, so a run stopped at 3 and resumed to 5 can be compared with one of 5.
_PAR_RUN = dict(lr=1e-2, min_lr=1e-2, warmup_iters=0, grad_accum_steps=2, eval_interval=3,
                grad_clip=0.05, weight_decay=0.1)  # norms ~0.5: the wrappers' clips matter


def _parallel_worker(rank: int, world_size: int, port: int, cache: str, out: str,
                     parallel: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train.train(_cfg(Path(cache), Path(out), parallel=parallel, max_iters=3,
                                  **_PAR_RUN))
    torch.save({k: v.detach() for k, v in result["model"].state_dict().items()},
               Path(out, f"rank{rank}.pt"))
    while not all(Path(out, f"rank{r}.pt").exists() for r in range(world_size)):
        time.sleep(0.05)  # rank 0 hosts the rendezvous store: it leaves last


@pytest.fixture(scope="module")
def _one_process_run(_cache, tmp_path_factory) -> tuple[Path, dict]:
    """One process on the global batch (2 x 4), 5 steps: what torch's DDP also equals."""
    out = tmp_path_factory.mktemp("one")
    result = train.train(_cfg(_cache, out, batch_size=8, max_iters=5, **_PAR_RUN))
    return out, result["model"].state_dict()


@pytest.mark.parametrize("parallel", ["ddp", "zero1", "fsdp"])
def test_parallel_train_equals_one_process_and_resumes_in_one(_cache, _one_process_run,
                                                               tmp_path, parallel):
    """Two gloo processes of 4 sequences with ddp.py's wrapper (2 accumulated micro-batches,
    clipped gradients, AdamW) take the steps one process takes on 8; their checkpoint holds the
    whole model and optimizer state, so one process of 8 sequences continues it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    torch.multiprocessing.spawn(_parallel_worker, args=(2, port, str(_cache), str(two),
                                                        parallel), nprocs=2, join=True)
    one_dir, one_final = _one_process_run
    r0, r1 = (torch.load(two / f"rank{r}.pt") for r in range(2))
    assert r0.keys() == r1.keys() == one_final.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # the replicas (or the shards) agree
    for key in ("loss", "grad_norm"):
        two_rows, one_rows = (_rows(d / "metrics.jsonl", key) for d in (two, one_dir))
        assert sorted(two_rows) == [1, 2, 3]
        assert two_rows == pytest.approx({i: one_rows[i] for i in (1, 2, 3)}, rel=1e-5)
    state = train.read_checkpoint(two / "ckpt.pt")
    assert state["world_size"] == 2 and state["config"]["parallel"] == parallel
    assert state["model"].keys() == one_final.keys()  # full weights, under the model's names
    assert (two / "samples.txt").exists()  # rank 0 sampled alone (FSDP: after unsharding)

    resumed = train.train(_cfg(_cache, two, batch_size=8, max_iters=5, resume=True,
                                   **_PAR_RUN))
    # AdamW divides by sqrt(v): where a gradient is ~0, float rounding of the averaging can move
    # an element by a fraction of lr = 1e-2; a wrong step would move whole tensors by ~lr.
    for name, value in one_final.items():
        torch.testing.assert_close(resumed["model"].state_dict()[name], value, rtol=1e-3,
                                   atol=1e-4, msg=name)
    loss_two, loss_one = (_rows(d / "metrics.jsonl", "loss") for d in (two, one_dir))
    assert loss_two == pytest.approx(loss_one, rel=1e-5) and sorted(loss_two) == [1, 2, 3, 4, 5]


def test_resume_at_another_world_size_needs_the_same_global_batch(_cache, tmp_path):
    train.train(_cfg(_cache, tmp_path, max_iters=1, eval_interval=0, num_samples=0))
    state = train.read_checkpoint(tmp_path / "ckpt.pt")
    state["world_size"] = 2  # as if 2 processes of 4 had written it
    cfg = _cfg(_cache, tmp_path, max_iters=2, resume=True)
    with pytest.raises(train.UsageError, match=r"batch_size=4 in the checkpoint but 4 now, with 2 "
                       r"process\(es\) then and 1 now \(the product must stay\)"):
        train.check_resumable(state, cfg, 1)
    train.check_resumable(state, _cfg(_cache, tmp_path, batch_size=8), 1)
    train.check_resumable(state, _cfg(_cache, tmp_path, parallel="fsdp"), 2)
    with pytest.raises(train.UsageError, match=r"--parallel='zero2': expected one of"):
        train.check_config(_cfg(_cache, tmp_path, parallel="zero2"))


@pytest.fixture
def _one_rank_group():
    """A process group of one gloo rank in this process: enough for the checks below."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                         world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_parallelize_refuses_what_it_cannot_do(_one_rank_group):
    model = train.LossModel(train.TransformerLM(train.ModelConfig(vocab_size=32, **_TINY_MODEL)))
    muon = Muon(train.param_groups_for_muon(model.model, lr=1e-2))
    with pytest.raises(ValueError, match="--parallel=fsdp steps flat shards of each matrix"):
        ddp.parallelize("fsdp", model, muon)
    learned = train.LossModel(train.TransformerLM(train.ModelConfig(
        vocab_size=32, positions="learned", **_TINY_MODEL)))
    with pytest.raises(ValueError, match="learned positions and kernels='triton' read one"):
        ddp.parallelize("fsdp", learned, AdamW(learned.parameters()))
    with pytest.raises(ValueError, match="parallel='zero2': expected 'ddp', 'zero1' or 'fsdp'"):
        ddp.parallelize("zero2", model, muon)
    # zero1 keeps the optimizer's class, groups and hyperparameters, and its restored state
    adamw = AdamW(train.decay_param_groups(model.model, 0.1), lr=1e-2)
    model(*torch.randint(0, 32, (2, 1, 8)))[0].backward()
    adamw.step()
    wrapped, sharded = ddp.parallelize("zero1", model, adamw)
    assert isinstance(wrapped, ddp.DDPBucketed) and isinstance(sharded.local, AdamW)
    full = sharded.full_state_dict()  # one rank owns everything: the optimizer's own state_dict
    expected = adamw.state_dict()
    assert full["param_groups"] == expected["param_groups"]
    assert all(torch.equal(full["state"][i]["exp_avg"], s["exp_avg"])
               for i, s in expected["state"].items())


def _shape_worker(rank: int, world_size: int, out: str) -> None:
    try:
        ddp.DDPFlat(nn.Linear(2, 2 + rank))  # a model that is not the same on both ranks
    except ValueError as e:
        Path(out, f"rank{rank}.txt").write_text(str(e))


def test_data_parallel_refuses_parameters_of_other_shapes_on_other_ranks(tmp_path):
    ddp.spawn(_shape_worker, 2, str(tmp_path))
    for r in range(2):  # both raise, so neither waits for the other in a collective
        assert (tmp_path / f"rank{r}.txt").read_text() == (
            "the parameter or buffer shapes differ across ranks: build the same model on every "
            "rank (rank 0's values are then copied to all)")


def _dying_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 died")
    torch.distributed.all_reduce(torch.ones(1))  # waits for a rank that is gone


def test_a_rank_that_dies_ends_the_others_with_a_clear_error():
    """Rank 0, waiting in its all-reduce, does not hang: either gloo sees the dead rank's closed
    connection ("typically caused by a remote worker crashing", or "hanging") or spawn() raises the
    dead rank's own error first and ends rank 0; the process group's 120 s timeout is the last
    resort."""
    with pytest.raises(Exception, match="rank 1 died|caused by a remote worker"):
        ddp.spawn(_dying_worker, 2)


import re  # noqa: E402


_BENCH_TINY = ["--preset=tiny", "--vocab_size=64", "--context_length=16", "--d_model=32",
               "--num_layers=2", "--num_heads=2", "--d_ff=64", "--batch_size=2"]


def test_bench_times_our_ddp_next_to_torchs_and_predicts_memory(capsys, tmp_path):
    world_size = 1 if torch.cuda.is_available() else 2  # the GPU machine may have one GPU
    rows = ddp.main(["bench", f"--world_size={world_size}", *_BENCH_TINY, "--warmup=1",
                     "--steps=1", f"--trace={tmp_path}"])
    out = capsys.readouterr().out
    assert list(rows) == list(ddp.BENCH_ROWS) == ["alone", "ours", "torch", "fsdp", "zero1"]
    assert all(seconds > 0 for seconds, _ in rows.values())
    params = M.count_params(M.ModelConfig.preset("tiny", vocab_size=64, context_length=16,
                                                 d_model=32, num_layers=2, num_heads=2, d_ff=64))
    assert f"tiny: {params['total']:,} parameters, {world_size} " in out
    predicted = ddp.accounting(params["total"], world_size)
    for name, (seconds, peak) in rows.items():
        label, scheme = ddp.BENCH_ROWS[name]
        line = next(line for line in out.splitlines() if line.startswith(f"  {label}  "))
        ms, comm, *memory = line[2 + 30:].split(maxsplit=2)
        assert float(ms) == pytest.approx(seconds * 1e3, abs=0.051)
        # the share spent communicating: what the step adds to the same step run alone
        assert comm == "-" if name == "alone" else comm == f"{1 - rows['alone'][0] / seconds:.0%}"
        assert memory[0].endswith(f"{predicted[scheme]['memory'] / 1e9:.4g}")
        assert (peak > 0) == torch.cuda.is_available()
        assert ("not measured" in memory[0]) != torch.cuda.is_available()
    for name in ("ours", "torch"):  # a chrome trace per row and rank, where overlap shows
        trace = json.loads((tmp_path / f"{name}_rank0.json").read_text())
        assert any(re.search("all_?reduce", e.get("name", ""), re.I) for e in trace["traceEvents"])


def test_bench_refuses_a_bad_world_size():
    most = torch.cuda.device_count() or 16
    for bad in (-1, most + 1):
        with pytest.raises(UsageError, match=rf"--world_size must be between 1 and {most} "
                                             rf"\(.*\), got {bad}$"):
            ddp.main(["bench", f"--world_size={bad}", *_BENCH_TINY])
    with pytest.raises(UsageError, match=r"--seq_len <= context_length \(16\)"):
        ddp.main(["bench", *_BENCH_TINY, "--seq_len=17"])


# =================================================================================================
# infer.py
# =================================================================================================

# infer.py: sampling, KV caches, batched / paged / speculative generation, quantization, GPT-2 -----
import shutil  # noqa: E402


import infer  # noqa: E402
from model import Linear, ModelConfig, TransformerLM  # noqa: E402
from tokenizer import DATA_DIR, Tokenizer  # noqa: E402

_BYTES = Tokenizer({i: bytes([i]) for i in range(256)}, [], [_EOT])  # one token per byte, eot 256
_INFER_VARIANTS = {"mha": {}, "gqa": dict(num_kv_heads=2), "mqa": dict(num_kv_heads=1),
             "window": dict(sliding_window=4), "mla": dict(kv_latent_dim=16),
             "linear": dict(mixer="linear_attention"), "hyena": dict(mixer="hyena"),
             "learned_post_layernorm": dict(positions="learned", norm="layernorm",
                                            norm_position="post"),
             "sinusoidal": dict(positions="sinusoidal")}


def _tiny_lm(seed: int = 0, vocab_size: int = 257, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(vocab_size=vocab_size, context_length=32, d_model=32,
                                   num_layers=2, num_heads=4, d_ff=64), **overrides})
    return TransformerLM(config).eval()


def _greedy_by_recompute(model: TransformerLM, ids: list[int], steps: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            x = torch.cat((x, model(x)[:, -1:].argmax(-1)), dim=1)
    return x[0, len(ids):].tolist()


@pytest.mark.parametrize("variant", _INFER_VARIANTS)
def test_cached_greedy_decoding_equals_recomputing_the_forward(variant):
    model = _tiny_lm(**_INFER_VARIANTS[variant])
    prompts = ["hello", "a", "the cat"]  # three lengths decode together, two samples each
    out = infer.generate_batch(model, _BYTES, prompts, n=2, max_new_tokens=8, temperature=0,
                               eos_id=-1)
    for completions, prompt in zip(out, prompts):
        want = _greedy_by_recompute(model, _BYTES.encode(prompt), 8)
        assert [c.token_ids for c in completions] == [want, want]
        assert [c.finish_reason for c in completions] == ["length", "length"]


def test_sliding_window_ring_cache_equals_the_full_forward():
    model = _tiny_lm(sliding_window=5, num_kv_heads=2)
    ids = torch.randint(0, 257, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = infer.StaticCache(model, 2, 32, prefill_chunk=3)
        assert cache.num_slots == 7  # W + chunk - 1 slots, whatever the length
        assert torch.allclose(infer.prefill(model, cache, ids[:, :11]), full[:, 10], atol=1e-5)
        for t in range(11, 30):
            logits = infer.forward_cached(model, cache, ids[:, t:t + 1], torch.full((2, 1), t))
            assert torch.allclose(logits[:, 0], full[:, t], atol=1e-5)


def test_batched_sampling_is_seeded_and_logprobs_are_the_models():
    model = _tiny_lm()
    kwargs = dict(n=3, max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=7,
                  return_logprobs=True, eos_id=-1)
    out = infer.generate_batch(model, _BYTES, ["ab", "xyz"], **kwargs)
    again = infer.generate_batch(model, _BYTES, ["ab", "xyz"], **kwargs)
    assert [[c.token_ids for c in r] for r in out] == [[c.token_ids for c in r] for r in again]
    for prompt, completions in zip(["ab", "xyz"], out):
        for c in completions:
            ids = torch.tensor([_BYTES.encode(prompt) + c.token_ids])
            with torch.no_grad():
                logprobs = model(ids)[0, len(prompt) - 1:-1].log_softmax(-1)
            want = logprobs.gather(-1, ids[0, len(prompt):, None])[:, 0]
            assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-4)
            assert c.text == _BYTES.decode(c.token_ids) and c.prompt_index in (0, 1)


class _Scripted(nn.Module):
    """A Hugging Face-like LM (returns an object with .logits) that writes a fixed script: the
    token after T tokens is script[T - prompt_len], with byte 'x' as the runner-up."""
    def __init__(self, script: list[int], prompt_len: int = 1) -> None:
        super().__init__()
        self.script, self.prompt_len = script, prompt_len
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor):
        logits = torch.zeros(*ids.shape, 258)
        logits[..., ord("x")] = 5.0
        step = ids.shape[1] - self.prompt_len
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return type("Output", (), {"logits": logits})()


def _run_script(script, tokenizer=_BYTES, **kwargs):
    script = [t if isinstance(t, int) else ord(t) for t in script]
    out = infer.generate_batch(_Scripted(script), tokenizer, ["p"], temperature=0, **kwargs)
    return out[0][0]


def test_stop_strings_cut_text_and_tokens_at_their_edges():
    c = _run_script("abc\n\nxyz", stop=["\n\n", "zz"])
    assert (c.text, c.token_ids, c.finish_reason) == ("abc", [97, 98, 99], "stop")
    c = _run_script("abc\n\nxyz", stop=["\n\n"], include_stop=True)
    assert (c.text, c.token_ids) == ("abc\n\n", [97, 98, 99, 10, 10])
    c = _run_script("ab\n\n", stop=["b\n", "\n\n"])  # the earliest start wins
    assert c.text == "a"
    c = _run_script("\n\nab\n\n", stop=["\n\n"])  # a stop string first: empty text
    assert (c.text, c.token_ids, c.finish_reason) == ("", [], "stop")
    for min_tokens, text in ((2, ""), (3, "\n\nab")):  # counts only once it ends at min_tokens
        assert _run_script("\n\nab\n\n", stop=["\n\n"], min_tokens=min_tokens).text == text
    c = _run_script("abcdef", stop=["zz"], max_new_tokens=4)
    assert (c.text, c.finish_reason) == ("abcd", "length")
    # a stop string that starts inside a token: that token is cut from token_ids, kept in text
    merged = Tokenizer({**{i: bytes([i]) for i in range(256)}, 256: b"bc"}, [(b"b", b"c")],
                       [_EOT])
    c = _run_script(["a", 256, "d", "e"], merged, stop=["cd"])
    assert (c.text, c.token_ids) == ("ab", [97])


def test_eos_stops_a_sequence_but_not_before_min_tokens():
    c = _run_script([256, "a"])
    assert (c.text, c.token_ids, c.finish_reason) == ("", [256], "eos")
    c = _run_script([256, 256, 256, "a"], min_tokens=2)  # eos masked twice: the runner-up 'x'
    assert (c.text, c.token_ids, c.finish_reason) == ("xx", [120, 120, 256], "eos")
    assert _run_script([256, "a"], eos_id=-1, max_new_tokens=2).finish_reason == "length"


def test_top_p_keeps_the_smallest_set_reaching_p():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(12, generator=generator) * 2
        p = float(torch.rand((), generator=generator)) * 0.98 + 0.01
        probs, order = logits.softmax(-1).sort(descending=True)
        size = next(k for k in range(1, 13) if probs[:k].sum() >= p)  # brute force
        kept = torch.isfinite(infer.top_p_filter(logits[None], p)[0])
        assert set(kept.nonzero()[:, 0].tolist()) == set(order[:size].tolist())
    kept = torch.isfinite(infer.top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2))
    assert kept.tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"), (dict(prompts=[""]), "empty"),
    (dict(prompts=["y" * 40]), "context"), (dict(min_tokens=9, max_new_tokens=4), "min_tokens"),
    (dict(prompts=[]), "non-empty")])
def test_generate_batch_rejects_bad_input_naming_it(kwargs, message):
    kwargs = {"prompts": ["ab"], **kwargs}
    with pytest.raises(ValueError, match=message):
        infer.generate_batch(_tiny_lm(), _BYTES, kwargs.pop("prompts"), **kwargs)


@pytest.mark.parametrize("variant", ["mha", "gqa", "window", "mla"])
def test_paged_continuous_batching_equals_one_by_one(variant):
    model = _tiny_lm(**_INFER_VARIANTS[variant])
    prompts, lengths = ["hello world", "a", "the cat sat", "xy"], [7, 12, 5, 9]
    want = [infer.generate_batch(model, _BYTES, [p], max_new_tokens=m, temperature=0,
                                 eos_id=-1)[0][0].token_ids for p, m in zip(prompts, lengths)]
    requests = [infer.Request(_BYTES.encode(p), m, n=2) for p, m in zip(prompts, lengths)]
    sampling = infer.Sampling(12, temperature=0, eos_id=-1)
    for continuous in (True, False):  # 3 rows for 8 sequences: requests wait; samples share
        with torch.no_grad():        # their prompt's blocks (4 tokens each), copied on write
            out = infer.serve(model, _BYTES, requests, sampling, max_seqs=3, block_size=4,
                              continuous=continuous)
        assert [[s.ids for s in r] for r in out] == [[w, w] for w in want]


def test_a_model_built_with_our_kernels_decodes_with_every_cache():
    """kernels="triton" gives attention kernels.py's subclass: still softmax attention with keys
    per token, so the paged cache, speculation and the stacked q | k | v take it."""
    fused = _tiny_lm(kernels="triton")
    assert type(fused.layers[0].attn) is kernels.TritonSelfAttention
    assert all(infer.caches_keys(layer.attn) for layer in fused.layers)
    assert infer.caches_keys(_tiny_lm(kv_latent_dim=16).layers[0].attn)
    assert not infer.caches_keys(_tiny_lm(mixer="linear_attention").layers[0].attn)
    assert infer.fuse_qkv(fused)[0] is not None
    prompt = _BYTES.encode("hello")
    want = _greedy_by_recompute(fused, prompt, 6)
    cached = infer.generate_batch(fused, _BYTES, [prompt], max_new_tokens=6, temperature=0,
                                  eos_id=-1)[0][0].token_ids
    with torch.no_grad():
        paged = infer.serve(fused, _BYTES, [infer.Request(prompt, 6)],
                            infer.Sampling(6, temperature=0, eos_id=-1), max_seqs=1,
                            block_size=4)[0][0].ids
    speculated = infer.speculative_generate(fused, fused, prompt, 6, k=3, temperature=0)[0]
    assert cached == paged == speculated == want


def test_serve_admits_a_request_that_fills_every_row():
    """A prompt ending inside a block, as many samples as rows: admission reserves that block
    for the prompt and a copy for each sample, and the pool must hold that (it once waited
    forever)."""
    model = _tiny_lm()
    for prompt, n in (("hello", 1), ("a", 2)):
        want = infer.generate_batch(model, _BYTES, [prompt], max_new_tokens=6, temperature=0,
                                    eos_id=-1)[0][0].token_ids
        with torch.no_grad():
            out = infer.serve(model, _BYTES, [infer.Request(_BYTES.encode(prompt), 6, n=n)],
                              infer.Sampling(6, temperature=0, eos_id=-1), max_seqs=n,
                              block_size=4)
        assert [s.ids for s in out[0]] == [want] * n


def test_paged_cache_shares_prefix_blocks_and_copies_on_write():
    cache = infer.PagedCache(_tiny_lm(), num_blocks=6, block_size=4, max_seqs=2,
                             max_blocks_per_seq=3)
    cache.prepare_write(0, 0), cache.prepare_write(0, 4)  # a 6-token prompt: 1 full, 1 partial
    cache.layers[0]["k"][cache.owned[0][1]] = 7.0
    cache.share(0, 1)
    assert cache.owned[1] == cache.owned[0] and cache.refs[cache.owned[0][1]] == 2
    assert cache.prepare_write(1, 6) == 1  # the shared partial block is copied for sample 1
    assert cache.owned[1][0] == cache.owned[0][0] and cache.owned[1][1] != cache.owned[0][1]
    keys = cache.layers[0]["k"]
    assert torch.equal(keys[cache.owned[1][1]], keys[cache.owned[0][1]])
    assert cache.prepare_write(0, 6) == 0  # sample 0 now owns its block alone
    assert cache.prepare_write(0, 8) == 1  # a block boundary: a new block
    cache.release(0), cache.release(1)
    assert sorted(cache.free) == [1, 2, 3, 4, 5] and not any(cache.refs)


def test_speculative_sampling_keeps_the_targets_distribution():
    generator = torch.Generator().manual_seed(0)
    batch, k, vocab = 40_000, 2, 5
    p = torch.rand(vocab, generator=generator).softmax(0) ** 2
    p, q = p / p.sum(), torch.rand(vocab, generator=generator) ** 3
    q = q / q.sum()
    draft = torch.multinomial(q.expand(batch * k, vocab), 1, True, generator=generator)
    draft = draft.view(batch, k)
    accepted, next_token = infer.speculative_accept(p.expand(batch, k + 1, vocab),
                                                    q.expand(batch, k, vocab), draft, generator)
    first = torch.where(accepted > 0, draft[:, 0], next_token)
    expected = p * batch

    def chi_square(tokens):
        return float(((torch.bincount(tokens, minlength=vocab) - expected) ** 2 / expected).sum())

    assert chi_square(first) < 18.47  # 4 degrees of freedom, p = 0.001
    assert chi_square(draft[:, 0]) > 1000  # the test can tell: the draft's own law fails it
    assert abs(float((accepted > 0).float().mean()) - float(torch.minimum(p, q).sum())) < 0.01


def test_speculative_generation_samples_the_targets_joint_distribution():
    """The whole loop, not only the accept rule: two sampled tokens against the target's law."""
    target, draft = _tiny_lm(0, vocab_size=5), _tiny_lm(1, vocab_size=5, num_layers=1)
    # T = 3 flattens these random models enough that every pair is expected >= 5 times; the
    # draft's own law then scores ~650, far above the bound
    prompt, vocab, runs, temperature = [1, 2, 3], 5, 800, 3.0
    with torch.no_grad():  # the target's P(t1, t2 | prompt), by two plain forwards
        first = infer.probabilities(target(torch.tensor([prompt]))[0, -1], temperature)
        second = infer.probabilities(target(torch.tensor(
            [prompt + [t] for t in range(vocab)]))[:, -1], temperature)
    expected = (first[:, None] * second).flatten() * runs
    generator = torch.Generator().manual_seed(0)
    pairs = [infer.speculative_generate(target, draft, prompt, 2, k=2, temperature=temperature,
                                        generator=generator)[0] for _ in range(runs)]
    counts = torch.bincount(torch.tensor([a * vocab + b for a, b in pairs]), minlength=vocab**2)
    assert float(((counts - expected) ** 2 / expected).sum()) < 52.6  # 24 dof, p = 0.001


def test_greedy_speculative_decoding_equals_the_target_alone():
    target, draft = _tiny_lm(0), _tiny_lm(1, num_layers=1, num_kv_heads=2)
    prompt = _BYTES.encode("hello")
    want = _greedy_by_recompute(target, prompt, 12)
    for proposer, all_pass in ((draft, False), (target, True)):
        out, stats = infer.speculative_generate(target, proposer, prompt, 12, k=3, temperature=0)
        assert out == want
        assert (stats["accepted"] == stats["proposed"]) == all_pass
        # the steady speed's clock starts after the first round, which compiles and captures
        assert stats["steady_seconds"] > 0 and 0 < stats["steady_tokens"] < len(out)
    # rounds are queued without waiting, so eos is found after the fact: the output still stops
    eos = want[7]
    out = infer.speculative_generate(target, draft, prompt, 12, k=3, temperature=0, eos_id=eos)[0]
    assert out == want[: want.index(eos) + 1]
    # a prompt that ends with it still generates (the command line's default prompt is eos alone)
    then = _greedy_by_recompute(target, prompt + [eos], 6)
    assert infer.speculative_generate(target, draft, prompt + [eos], 6, k=3, temperature=0,
                                      eos_id=eos)[0] == then[: (then + [eos]).index(eos) + 1]
    # sampling: a draft equal to the target has every token accepted (p = q)
    out, stats = infer.speculative_generate(target, target, prompt, 12, k=3, temperature=0.8,
                                            generator=torch.Generator().manual_seed(0))
    assert len(out) == 12 and stats["accepted"] == stats["proposed"]


@_CUDA
def test_speculative_decoding_compiled_on_gpu_equals_the_target_alone():
    """The rounds are queued with no wait, their positions updated in place on the device: under
    CUDA graphs a step must read the position of its own round."""
    target, draft = _tiny_lm(0), _tiny_lm(1, num_layers=1)
    prompt = _BYTES.encode("hello")
    want = _greedy_by_recompute(target, prompt, 20)
    target, draft = target.cuda(), draft.cuda()
    for k in (1, 3):
        out, stats = infer.speculative_generate(target, draft, prompt, 20, k=k, temperature=0,
                                                compile=True)
        assert out == want and 20 <= stats["accepted"] + stats["rounds"] <= 20 + k
    out, stats = infer.speculative_generate(target, target, prompt, 20, k=3, temperature=0.8,
                                            generator=torch.Generator("cuda").manual_seed(0),
                                            compile=True)
    assert len(out) == 20 and stats["accepted"] == stats["proposed"]


def test_speculative_report_splits_a_round_and_says_where_speculation_pays(monkeypatch):
    assert infer.tokens_per_round(0.0, 4) == 1 and infer.tokens_per_round(1.0, 3) == 4
    assert infer.tokens_per_round(0.5, 2) == 1.75  # 1 + 1/2 + 1/4
    target, draft = _tiny_lm(0), _tiny_lm(1, num_layers=1)
    prompt = _BYTES.encode("hello")
    ids, report = infer.speculative_speed(target, draft, prompt, 12, 3, False, temperature=0)
    assert ids == _greedy_by_recompute(target, prompt, 12)
    assert "\n  a round " in report and "a verify step (4 tokens) of " in report
    # the arithmetic, on set timings: 4 steady rounds of 2 ms against plain steps of 1 ms
    stats = dict(proposed=15, accepted=6, rounds=5, steady_seconds=0.008, steady_tokens=9)
    monkeypatch.setattr(infer, "speculative_generate", lambda *a, **kw: ([7] * 11, stats))
    steps = {(id(target), 1): 1e-3, (id(draft), 1): 1.5e-4, (id(target), 4): 1.2e-3}
    monkeypatch.setattr(infer, "measure_decode", lambda model, *a, tokens_per_step=1, **kw: {
        "step": steps[id(model), tokens_per_step]})
    line = infer.speculative_speed(target, draft, prompt, 12, 3, False)[1].splitlines()[1]
    # 1 + a + a^2 + a^3 = 2 at a = 0.5437
    assert line == ("  a round 2.000 ms: 4 draft steps of 0.150, a verify step (4 tokens) of "
                    "1.200, the rest 0.200 (the accept rule, launches, waits); a plain step "
                    "1.000 ms, so speculation pays above 2.00 tokens a round (acceptance 0.54)")
    stats["steady_seconds"] = 0.024  # rounds of 6 ms: even 4 tokens each would not pay
    assert infer.speculative_speed(target, draft, prompt, 12, 3, False)[1].endswith(
        "pays above 6.00 tokens a round: more than k + 1 = 4, so not at any acceptance")
    monkeypatch.setitem(stats, "rounds", 1)  # one round: its time includes compiling, no split
    assert "\n" not in infer.speculative_speed(target, draft, prompt, 12, 3, False)[1]


def test_measure_decode_times_verify_steps_on_a_cache_just_long_enough(monkeypatch):
    made = []

    class Recorded(infer.Decoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self, args[2]))

    monkeypatch.setattr(infer, "Decoder", Recorded)
    assert infer.measure_decode(_tiny_lm(), 1, 4, 6, False, tokens_per_step=3)["step"] > 0
    (decoder, max_len), = made
    assert max_len == 4 + 6 + 2 and decoder.token_ids.shape == (1, 3)
    assert int(decoder.positions.max()) == max_len  # the last step wrote the cache's last slot


def test_quantized_matmuls_within_half_a_step():
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(64, 256, generator=generator), torch.randn(8, 256, generator=generator)
    q, scale = infer.quantize_int8(weight)
    assert q.dtype == torch.int8 and (q.float() * scale[:, None] - weight).abs().le(
        scale[:, None] / 2 + 1e-6).all()
    packed, scale4 = infer.quantize_int4(weight, 32)
    assert packed.shape == (64, 128) and packed.dtype == torch.uint8
    error = (infer.dequantize_int4(packed, scale4, 32) - weight).abs()
    assert error.le(scale4.repeat_interleave(32, 1) / 2 + 1e-6).all()
    linear = Linear(256, 64, bias=True)
    with torch.no_grad():
        linear.weight.copy_(weight), linear.bias.fill_(0.5)
        exact = linear(x)
        for bits, tolerance in ((8, 0.02), (4, 0.2)):
            layer = infer.QuantLinear(linear, bits, 32)
            assert torch.allclose(layer(x), x @ layer.dequantized().T + 0.5, atol=1e-4)
            assert float((layer(x) - exact).norm() / exact.norm()) < tolerance
    model = infer.quantize_model(_tiny_lm(tie_weights=True), 8)
    assert isinstance(model.lm_head, infer.QuantLinear) and isinstance(model.token_embeddings,
                                                                        nn.Module)
    assert infer.weight_bytes(model) < infer.weight_bytes(_tiny_lm(tie_weights=True)) / 3


def test_roofline_reproduces_the_lectures_llama2_13b_table():
    config, h100 = ModelConfig(**infer.LLAMA2_13B), infer.GPUS["H100"]
    one = infer.decode_roofline(config, 1, 1024, h100["bandwidth"], h100["peak_flops"])
    many = infer.decode_roofline(config, 64, 1024, h100["bandwidth"], h100["peak_flops"])
    assert round(one["memory"] / 1e9, 1) == 26.9 and round(many["memory"] / 1e9, 1) == 79.7
    assert round(one["step"] * 1e3, 1) == 8.0 and round(one["tokens_per_s"]) == 125
    assert abs(many["tokens_per_s"] - 2689) < 1 and many["bound"] == "memory"
    no_cache = infer.decode_roofline(config, 1, 0, h100["bandwidth"], h100["peak_flops"])
    assert one["compute_bound_from"] == float("inf") and 290 < no_cache["compute_bound_from"] < 300


def _save_checkpoint(tmp_path, model, tokenizer, **changes):
    tmp_path.mkdir(exist_ok=True)
    tokenizer.save_dir(tmp_path / "tok")
    state = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
             "config": {"tokenizer_dir": str(tmp_path / "tok")},
             "tokenizer": tokenizer.fingerprint(), **changes}
    torch.save(state, tmp_path / "ckpt.pt")
    return str(tmp_path / "ckpt.pt")


def test_checkpoint_generation_from_the_command_line(tmp_path, capsys, monkeypatch):
    model = _tiny_lm()
    path = _save_checkpoint(tmp_path, model, _BYTES)
    infer.main([f"--ckpt={path}", "--prompt=hello", "--max_new_tokens=6", "--temperature=0"])
    printed = capsys.readouterr().out
    want = _BYTES.decode(_greedy_by_recompute(model, _BYTES.encode("hello"), 6))
    assert printed.startswith("hello" + want.split("<|endoftext|>")[0][:1])
    assert printed.strip().endswith("]")
    infer.main([f"--ckpt={path}", "--prompt=ab", "--max_new_tokens=3", "--num_samples=2",
                "--seed=1", "--quantize=int8"])
    assert capsys.readouterr().out.count("--- sample") == 2
    draft = _save_checkpoint(tmp_path / "draft", _tiny_lm(1, num_layers=1), _BYTES)
    infer.main([f"--ckpt={path}", f"--draft_ckpt={draft}", "--prompt=hello", "--temperature=0",
                "--max_new_tokens=6", "--speculate_k=2"])
    captured = capsys.readouterr()
    assert captured.out.startswith("hello" + want[:1]) and "acceptance" in captured.err
    assert "compiling" not in captured.err
    # compiled (as on a GPU), it says first what the silent minutes before any text are for
    monkeypatch.setattr(infer, "use_compile", lambda setting, device: True)
    monkeypatch.setattr(infer, "speculative_speed", lambda *a, **k: ([104], "a report"))
    infer.main([f"--ckpt={path}", f"--draft_ckpt={draft}", "--prompt=hello"])
    captured = capsys.readouterr()
    assert captured.err.index("compiling the draft's step") < captured.err.index("a report")


def test_bad_checkpoints_and_folders_get_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="python train.py"):
        infer.load_checkpoint_model(str(tmp_path / "none.pt"))
    path = _save_checkpoint(tmp_path, _tiny_lm(), _BYTES,
                            model_config={**dataclasses.asdict(_tiny_lm().config),
                                          "d_model": 64})
    with pytest.raises(ValueError, match="mis-shaped"):
        infer.load_checkpoint_model(path)
    other = Tokenizer({i: bytes([i]) for i in range(256)}, [], [])  # 256 ids, no eot
    path = _save_checkpoint(tmp_path, _tiny_lm(), other)
    with pytest.raises(ValueError, match="another vocabulary"):
        infer.load_checkpoint_model(path)
    with pytest.raises(FileNotFoundError, match="lacks config.json, vocab.json, merges.txt"):
        infer.load_gpt2(tmp_path)
    gpt2 = tmp_path / "gpt2"  # model.safetensors without the safetensors package: say so
    gpt2.mkdir()
    for name, text in (("config.json", json.dumps(dict(n_layer=1, n_embd=8, n_head=2,
                                                        vocab_size=256, n_positions=8))),
                       ("vocab.json", "{}"), ("merges.txt", ""), ("model.safetensors", "")):
        (gpt2 / name).write_text(text)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "safetensors", None)
        with pytest.raises(UsageError, match="needs: pip install safetensors"):
            infer.load_gpt2(gpt2)
    for flag, message in (("--top_p=1.5", "top_p"), ("--temperature=-1", "temperature"),
                          ("--quantize=int3", "int8 or int4")):  # checked before loading
        with pytest.raises(ValueError, match=message):
            infer.main([f"--ckpt={tmp_path / 'none.pt'}", flag])


def test_gpt2_folder_gives_the_logits_of_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA_DIR / f"gpt2_{name}", tmp_path / name)
    model, tokenizer = infer.load_gpt2(tmp_path)
    ids = torch.tensor([tokenizer.encode("Hello world, this is GPT-2 speaking.")])
    with torch.no_grad():
        assert torch.allclose(model(ids), reference(ids).logits, atol=1e-5)
        want = reference.generate(ids[:, :3], max_new_tokens=6, do_sample=False)[0, 3:].tolist()
    got = infer.generate_batch(model, tokenizer, [ids[0, :3].tolist()], max_new_tokens=6,
                               temperature=0)[0][0].token_ids
    assert got == want[: len(got)] and len(got) >= 1


def test_quantize_command_reports_perplexity_on_the_runs_held_out_text(tmp_path, capsys):
    path = _save_checkpoint(tmp_path, _tiny_lm(d_model=32), _BYTES)
    (tmp_path / "val.txt").write_text("the cat sat on the mat. " * 40)
    infer.main(["quantize", f"--ckpt={path}", "--group_size=32"])
    rows = capsys.readouterr().out.splitlines()[2:]
    perplexities = [float(row.split()[4]) for row in rows]
    assert [row.split()[0] for row in rows] == ["unquantized", "int8/channel", "int4/g32"]
    assert abs(perplexities[1] - perplexities[0]) < 0.05 * perplexities[0]

def test_stream_printer_holds_back_possible_stop_strings_and_split_characters(capsys):
    printer, generation = infer.StreamPrinter("P:", ["\n\n"]), infer.Generation(0, 9)
    shown = []
    for text in ["a", "ab", "ab\ufffd", "ab\u20ac", "ab\u20acc"]:  # the euro sign arrives late
        generation.text = text
        printer(0, generation)
        shown.append(capsys.readouterr().out)
    generation.finish_reason = "length"
    printer(0, generation)
    assert shown == ["P:", "a", "", "b", "\u20ac"]
    assert capsys.readouterr().out == "c\n[length]\n"


@_CUDA
@pytest.mark.parametrize("variant", ["mha", "gqa", "mla", "linear", "learned_post_layernorm"])
def test_compiled_cuda_graph_decode_equals_eager_on_gpu(variant):
    model = _tiny_lm(**_INFER_VARIANTS[variant]).cuda()
    prompt = torch.randint(0, 257, (3, 5), device="cuda", generator=torch.Generator(
        "cuda").manual_seed(0))
    steps = []
    for compile in (False, True):
        decoder = infer.Decoder(model, 3, 16, compile=compile, cuda_graph=compile)
        with torch.no_grad():
            tokens = infer.prefill(model, decoder.cache, prompt).argmax(-1)
            logits = []
            for position in range(5, 12):
                logits.append(decoder.decode(tokens, torch.full((3,), position,
                                                                device="cuda")).clone())
                tokens = logits[-1].argmax(-1)
        steps.append(torch.stack(logits))
        assert decoder.mode == ("compiled + CUDA graph" if compile else "eager")
    assert torch.allclose(steps[0], steps[1], atol=1e-3, rtol=1e-3)


@_CUDA
def test_generate_batch_compiled_on_gpu_equals_eager_and_bench_runs(capsys):
    model = _tiny_lm().cuda()
    out = [infer.generate_batch(model, _BYTES, ["hello", "a"], n=2, max_new_tokens=10,
                                temperature=0, eos_id=-1, compile=compile) for compile in
           (False, True)]
    assert [[c.token_ids for c in r] for r in out[0]] == [[c.token_ids for c in r] for r in out[1]]
    infer.main(["bench", "--preset=tiny", "--batch_sizes=[1,4]", "--requests=8",
                "--compile=False"])  # eager + CUDA graphs: compiling is tested above
    printed = capsys.readouterr().out
    assert "continuous batching" in printed and "int4/g128" in printed


def _greedy_ids_by_recompute(model: TransformerLM, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat((ids, model(ids)[:, -1:].argmax(-1)), dim=1)
    return ids


def _chained(decoder: infer.Decoder, model: TransformerLM, prompt: torch.Tensor,
             steps: int) -> torch.Tensor:
    """Greedy tokens from a greedy Decoder: one decode with inputs, then decode() alone."""
    with torch.no_grad():
        tokens = [infer.prefill(model, decoder.cache, prompt).argmax(-1)]
        start = torch.full((len(prompt),), prompt.shape[1], device=prompt.device)
        tokens.append(decoder.decode(tokens[0], start).argmax(-1))
        for _ in range(steps - 2):
            tokens.append(decoder.decode().argmax(-1))
    return torch.stack(tokens, 1)


@pytest.mark.parametrize("variant", [{}, dict(mixer="linear_attention"), dict(kv_latent_dim=16),
                                     dict(positions="learned", norm="layernorm", bias=True,
                                          ffn="gelu_tanh")])
def test_greedy_steps_chained_in_the_decoder_equal_recomputing(variant):
    model = _tiny_lm(**variant)
    prompt = torch.randint(0, 257, (3, 5), generator=torch.Generator().manual_seed(0))
    want = _greedy_ids_by_recompute(model, prompt, 8)[:, 5:]
    for prepare in (False, True):  # True: the warm-up step of a compile, then restored
        decoder = infer.Decoder(model, 3, 16, greedy=True)
        decoder.ready = not prepare
        assert torch.equal(_chained(decoder, model, prompt, 8), want)
        assert int(decoder.positions[0, 0]) == 5 + 7  # the position after the last step


def test_measure_decode_times_chained_steps_and_profiles_them():
    model = _tiny_lm()
    r = infer.measure_decode(model, 2, 4, 6, compile=False)
    assert r["step"] > 0 and r["mode"] == "eager" and r["bytes"] > infer.weight_bytes(model)
    decoder = infer.Decoder(model, 2, 8, greedy=True)
    first, *slowest = infer.profile_decode(decoder, 1e-3, steps=2).splitlines()
    assert " ops a step, busy " in first and " of 1,000 us" in first and len(slowest) == 5


@_CUDA
@pytest.mark.parametrize("batch", [1, 4])
def test_compiled_greedy_graph_chains_like_eager_on_gpu(batch):
    model = _tiny_lm(positions="learned", norm="layernorm", bias=True, ffn="gelu_tanh").cuda()
    prompt = torch.randint(0, 257, (batch, 5), device="cuda")
    out = []
    for compile in (False, True):
        decoder = infer.Decoder(model, batch, 16, compile=compile, greedy=True, fused=False)
        out.append(_chained(decoder, model, prompt, 8))
        assert decoder.mode == ("compiled" if compile else "eager") + " + CUDA graph"
    assert torch.equal(out[0], out[1])


def _fused_lm(**overrides) -> TransformerLM:
    """_tiny_lm with its biases and norm weights moved off their 0 and 1 inits: a kernel that
    drops a bias, or reads another layer's norm weights, must change the logits."""
    model, generator = _tiny_lm(**overrides), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # each its own noise: layers' norms differ too
                p.add_(torch.randn(p.shape, generator=generator), alpha=0.2)
    return model


_FUSED_VARIANTS = {"gpt2": dict(positions="learned", norm="layernorm", bias=True, ffn="gelu_tanh"),
                   "llama_gqa": dict(num_kv_heads=2, d_ff=80),  # RoPE, RMSNorm, SwiGLU
                   "plain": dict(positions="none", norm="none", ffn="relu", num_kv_heads=1)}


@pytest.mark.parametrize("variant, programs", [("gpt2", 9), ("llama_gqa", 4), ("plain", 4)])
def test_fused_decode_step_equals_the_unfused_one(variant, programs, monkeypatch):
    """kernels.py's one-kernel step (in Triton's interpreter: a launch per phase) against
    forward_cached: the same logits and greedy tokens, the cache filled alike. 9 programs: rows
    split unevenly, some programs' tiles all padding; attention over 4-slot blocks of the cache
    (its interpreter setting), so 6 to 8 cached tokens take two."""
    if not kernels.INTERPRET:
        pytest.skip("CPU tensors need Triton's interpreter (off on a GPU machine: the test below)")
    monkeypatch.setattr(kernels, "decode_programs", lambda device: programs)
    model = _fused_lm(d_model=64, **_FUSED_VARIANTS[variant])
    prompt = torch.randint(0, 257, (1, 6), generator=torch.Generator().manual_seed(0))
    tokens, logits, caches = [], [], []
    for fused in (False, True):
        decoder = infer.Decoder(model, 1, 12, greedy=True, fused=fused)
        tokens.append(_chained(decoder, model, prompt, 3))
        assert decoder.mode == ("fused kernel" if fused else "eager")  # after: no fallback
        logits.append(decoder.logits if decoder.graph else decoder.decode().clone())
        caches.append(decoder.cache.layers[1]["v"][0, :9].clone())
    assert torch.equal(tokens[0], tokens[1])
    torch.testing.assert_close(logits[1].float(), logits[0].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches[1], caches[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_fused_decode_streams_16_bit_weights(dtype, atol, monkeypatch):
    """16-bit weights through the tile descriptor (the test above streams float32), d_model 96
    as 3 chunks of 32 in a box of 4 (the copy's zeros fill the fourth). The same greedy tokens
    as the unfused step, logits within 16-bit rounding."""
    if not kernels.INTERPRET:
        pytest.skip("CPU tensors need Triton's interpreter (the GPU test below runs bfloat16)")
    monkeypatch.setattr(kernels, "decode_programs", lambda device: 9)
    model = infer.cast_weights(_fused_lm(d_model=96, num_heads=6, **_FUSED_VARIANTS["gpt2"]), dtype)
    prompt = torch.randint(0, 257, (1, 6), generator=torch.Generator().manual_seed(0))
    tokens, logits = [], []
    for fused in (False, True):
        decoder = infer.Decoder(model, 1, 12, greedy=True, fused=fused)
        tokens.append(_chained(decoder, model, prompt, 3))
        assert decoder.mode == ("fused kernel" if fused else "eager")
        assert not fused or decoder.step.meta["NCP"] == 4
        logits.append(decoder.decode().float())
    assert torch.equal(tokens[0], tokens[1])
    torch.testing.assert_close(logits[1], logits[0], atol=atol, rtol=0)


def test_fused_decode_names_what_it_cannot_run():
    for overrides, why in [(dict(sliding_window=4), "sliding window"),
                           (dict(mixer="linear_attention"), "linear attention"),
                           (dict(norm_position="post"), "post-norm"), ({}, "head dim 8"),
                           (dict(d_model=4096, num_heads=32), "registers")]:
        assert why in kernels.fused_decode_unsupported(_tiny_lm(**overrides), 132)
    assert "8 key-value heads on 4 programs" in kernels.fused_decode_unsupported(
        _tiny_lm(d_model=128, num_heads=8), 4)
    gpt2_medium = _tiny_lm(d_model=1024, num_heads=16, d_ff=4096, num_layers=1)
    for dtype, rows in ((torch.float32, 4), (torch.bfloat16, 8)):  # tiles of 16 KB
        assert kernels.fused_decode_unsupported(gpt2_medium.to(dtype), 132) == ""
        assert kernels.decode_tile_rows(gpt2_medium.to(dtype)) == rows
    assert "torch.float64 weights" in kernels.fused_decode_unsupported(
        _tiny_lm(d_model=64).to(torch.float64), 4)
    quantized = infer.quantize_model(_tiny_lm(d_model=64), 8)
    assert "quantized" in kernels.fused_decode_unsupported(quantized, 4)
    decoder = infer.Decoder(_tiny_lm(sliding_window=4), 1, 8, fused=True)  # asked: says why
    assert decoder.step is None and "sliding window" in decoder.mode
    assert infer.Decoder(_tiny_lm(d_model=64), 1, 8).step is None  # auto: CUDA only
    assert infer.Decoder(_tiny_lm(d_model=64), 2, 8, fused=True).step is None  # batch 1 only


@_CUDA
@pytest.mark.parametrize("variant", ["gpt2", "llama_gqa"])
def test_fused_decode_on_gpu_equals_the_unfused_step(variant):
    """At a GPU shape, as a CUDA graph with the grid barrier (the interpreter cannot run it),
    past 128 cached tokens (two attention blocks). float32: the same greedy tokens as the unfused
    step for 20 steps. bfloat16: the same logits within its rounding, fed the same tokens (greedy
    tokens part where two bfloat16 logits tie exactly, as they do here within 20 steps)."""
    model = _fused_lm(d_model=512, num_heads=8, num_layers=4, vocab_size=1000,
                      context_length=256, **_FUSED_VARIANTS[variant]).cuda()
    prompt = torch.randint(0, 1000, (1, 120), generator=torch.Generator().manual_seed(0)).cuda()
    out = []
    for fused in (False, True):
        decoder = infer.Decoder(model, 1, 160, greedy=True, fused=fused)
        out.append(_chained(decoder, model, prompt, 20))
        assert decoder.mode == ("fused kernel" if fused else "eager") + " + CUDA graph"
    assert torch.equal(out[0], out[1])
    model = infer.cast_weights(model, torch.bfloat16)
    decoders = [infer.Decoder(model, 1, 160, greedy=True, fused=fused) for fused in (False, True)]
    with torch.no_grad():
        for decoder in decoders:
            infer.prefill(model, decoder.cache, prompt)
        for i, token in enumerate(out[0][0, :-1]):
            position = torch.tensor([120 + i], device="cuda")
            want, got = (decoder.decode(token.view(1), position).float() for decoder in decoders)
            torch.testing.assert_close(got, want, atol=0.05, rtol=0)
    assert decoders[1].mode == "fused kernel + CUDA graph"


# =================================================================================================
# scaling.py
# =================================================================================================

from types import SimpleNamespace  # noqa: E402

import scaling  # noqa: E402
from scaling import CHINCHILLA, LossLaw, Runs  # noqa: E402


def _write_runs(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows))
    return path


def _iso_rows(budget: float, sizes: list[float], losses: list[float]) -> list[dict]:
    return [{"parameters": n, "compute_budget": budget, "final_loss": loss}
            for n, loss in zip(sizes, losses)]


def test_scaling_napkin_math_known_answers(capsys):
    assert scaling.training_days(70e9, 15e12, 1024, 0.5) == pytest.approx(144.0, abs=0.1)
    assert scaling.training_flops(70e9, 15e12) == pytest.approx(6.3e24)
    config = ModelConfig.preset("nanogpt")  # SwiGLU with d_ff = 8/3 d: 12 L d^2 holds
    approx = scaling.non_embedding_params_approx(config.num_layers, config.d_model)
    norms = (2 * config.num_layers + 1) * config.d_model
    assert scaling.non_embedding_params(config) == approx + norms
    assert scaling.training_flops_exact(config, 10) == 10 * M.flops_per_token(config, 1024)["train"]
    # serving: 2 N per token on top of 6 N D
    assert scaling.lifetime_flops(1e9, 2e10, 1e11) == pytest.approx(6 * 1e9 * 2e10 + 2e20)
    scaling.main(["napkin", "--params=70e9", "--tokens=15e12", "--gpus=1024", "--mfu=0.5"])
    out = capsys.readouterr().out
    assert "144.0 days" in out and "1.4e+12 tokens" in out and "214 per parameter" in out
    with pytest.raises(UsageError, match="0 < --mfu <= 1"):
        scaling.main(["napkin", "--mfu=1.5"])


def test_scaling_shapes_for_a_budget_span_the_range_in_the_family():
    family = scaling.ShapeFamily(aspect_ratio=64, head_dim=64, vocab_size=1000)
    found = scaling.shapes_for_budget(1e18, 5e6, 2e8, family)
    assert len(found) >= 5
    for config, N, D in found:
        assert 5e6 <= N <= 2e8 and N == M.count_params(config)["total"]
        assert config.d_ff % 64 == 0 and abs(config.d_ff - 8 / 3 * config.d_model) <= 32
        assert config.d_model == 64 * config.num_layers == 64 * config.num_heads
        assert 6 * N * D == pytest.approx(1e18)
    Ns = [N for _, N, _ in found]
    assert Ns == sorted(Ns)
    with pytest.raises(UsageError, match="min_params <= max_params"):
        scaling.shapes_for_budget(1e18, 2e8, 5e6)


def _relative_errors(fit: LossLaw, law: LossLaw) -> list[float]:
    return [abs(getattr(fit, k) / getattr(law, k) - 1) for k in ("E", "A", "B", "alpha", "beta")]


def test_scaling_approach3_recovers_the_law_with_and_without_noise():
    exact = scaling.fit_approach3(scaling.synthetic_runs(noise=0.0))
    assert max(_relative_errors(exact, CHINCHILLA)) < 1e-4
    noisy_runs = scaling.synthetic_runs(noise=0.002, seed=1)
    noisy = scaling.fit_approach3(noisy_runs)
    assert max(_relative_errors(noisy, CHINCHILLA)) < 0.05
    assert noisy == scaling.fit_approach3(noisy_runs)  # deterministic: no random starts
    # the closed-form frontier is the minimum of L(N, C / 6N) over N
    N = np.logspace(8, 12, 40001)
    numeric = N[np.argmin(CHINCHILLA.loss(N, 1e23 / (6 * N)))]
    frontier = CHINCHILLA.frontier(1e23)
    assert frontier["N"] == pytest.approx(numeric, rel=1e-3)
    assert frontier["loss"] == pytest.approx(CHINCHILLA.loss(numeric, 1e23 / (6 * numeric)))


def test_scaling_approach2_exponent_matches_the_analytic_optimum():
    law = CHINCHILLA
    assert law.a == pytest.approx(0.28 / 0.62)
    for noise, tolerance in ((0.0, 1e-3), (0.002, 0.01)):
        runs = scaling.synthetic_runs(law, noise=noise, seed=2)
        laws = scaling.fit_approach2(scaling.isoflops_points(runs))
        assert abs(laws.a - law.a) < tolerance
    first = scaling.bootstrap_approach2(runs, [1e23], samples=30, seed=3)
    assert first == scaling.bootstrap_approach2(runs, [1e23], samples=30, seed=3)
    assert first != scaling.bootstrap_approach2(runs, [1e23], samples=30, seed=4)
    low, high = first[1e23]["N"]
    assert low < laws.predict(1e23)["N"] < high


def test_scaling_approach1_envelope_and_run_folders(tmp_path, capsys):
    _, a = scaling.fit_approach1(scaling.synthetic_curves())
    assert abs(a - CHINCHILLA.a) < 0.01
    # train.py run folders: metrics.jsonl rows (evaluation rows have no "loss"), ckpt.pt's config
    config = ModelConfig(vocab_size=64, context_length=16, d_model=32, num_layers=1, num_heads=2,
                         d_ff=64)
    folder = tmp_path / "run"
    folder.mkdir()
    rows = [{"iter": 0, "tokens": 0, "loss": 9.0}, {"iter": 10, "tokens": 320, "loss": 4.0},
            {"iter": 10, "tokens": 320, "val_loss": 4.2}, {"iter": 20, "tokens": 640, "loss": 3.5}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.save({"model_config": dataclasses.asdict(config)}, folder / "ckpt.pt")
    N, flops, loss = scaling.load_curve(folder)
    assert N == M.count_params(config)["total"] and list(loss) == [4.0, 3.5]
    assert list(flops) == [M.flops_per_token(config, 16)["train"] * t for t in (320, 640)]
    N, flops, _ = scaling.load_curve(folder, params=1000)
    assert N == 1000 and list(flops) == [6 * 1000 * 320, 6 * 1000 * 640]
    with pytest.raises(UsageError, match="no metrics.jsonl"):
        scaling.load_curve(tmp_path)
    with pytest.raises(UsageError, match="at least three model sizes"):
        scaling.envelope([scaling.load_curve(folder)] * 3)
    # the command on run folders whose curves follow the law, N given on the command line
    folders = []
    sizes = (1e7, 3e7, 1e8, 3e8, 1e9)
    for i, (N, flops, loss) in enumerate(scaling.synthetic_curves(sizes=sizes)):
        folders.append(tmp_path / f"size{i}")
        folders[-1].mkdir()
        tokens = flops / (6 * N)
        (folders[-1] / "metrics.jsonl").write_text("".join(
            json.dumps({"iter": j, "tokens": t, "loss": v}) + "\n"
            for j, (t, v) in enumerate(zip(tokens, loss))))
    scaling.main(["envelope", *(f"{f}:{N}" for f, N in zip(folders, sizes))])
    out = capsys.readouterr().out
    assert "best N        1e+08" in out and "best N        3e+08" in out
    assert "approach 1: N_opt =" in out
    with pytest.raises(UsageError, match="fewer than two inner model sizes"):
        scaling.fit_approach1(scaling.synthetic_curves(sizes=(1e7, 1e8, 1e9)))
    with pytest.raises(UsageError, match="write a run folder as DIR or DIR:N"):
        scaling.main(["envelope", f"{folders[0]}:many"])


def test_scaling_kaplan_fit_recovers_its_own_form_and_its_allocation():
    law = scaling.KaplanLaw(N_c=8.8e13, D_c=5.4e13, alpha_N=0.076, alpha_D=0.095)  # Kaplan's
    N, D = np.logspace(7, 10, 7).repeat(7), np.tile(np.logspace(8, 11, 7), 7)
    fit = scaling.fit_kaplan(Runs(N, 6 * N * D, law.loss(N, D)))
    for key in ("alpha_N", "alpha_D", "N_c", "D_c"):
        assert getattr(fit, key) == pytest.approx(getattr(law, key), rel=1e-3)
    # a = alpha_D / (alpha_N + alpha_D): the slope of the numeric optimum against C
    grid = np.logspace(6, 14, 80001)
    best = [grid[np.argmin(law.loss(grid, C / (6 * grid)))] for C in (1e20, 1e24)]
    assert math.log(best[1] / best[0]) / math.log(1e4) == pytest.approx(law.a, abs=2e-3)


def test_scaling_tour_on_the_course_runs_prints_the_fits(capsys):
    scaling.main([])
    out = capsys.readouterr().out
    assert "144.0 days" in out and "shapes for C = 1e+19" in out
    assert "72 runs, 9 budgets" in out
    assert "3.00e+21     8    1.215e+10      1.5e+10    3.333e+10    2.2  3.7689" in out
    assert "N_opt = 0.1332 C^0.5146   D_opt = C / 6 N_opt = 1.252 C^0.4854" in out
    # the course's runs lie on one surface: approach 3 finds it exactly
    assert "L(N, D) = 2.69 + 1606 / N^0.3400 + 3211 / D^0.3600   ->   N_opt ~ C^0.5143" in out
    assert "C = 1e+23: N_opt 9.11e+10 [8.64e+10, 9.46e+10]  D_opt 1.83e+11" in out
    assert "C = 1e+24: N_opt 2.98e+11 [2.79e+11, 3.14e+11]  D_opt 5.59e+11" in out
    assert "approach 3: N_opt 3e+11  D_opt 5.55e+11  loss 3.081" in out
    assert "Kaplan et al. put N_opt ~ C^0.73" in out and "= 0.56" in out


def test_scaling_fit_reads_csv_and_writes_plots_or_says_why_not(tmp_path, capsys, monkeypatch):
    rows = json.loads(scaling.COURSE_RUNS.read_text())
    lines = ["parameters,compute_budget,final_loss"] + [
        f"{r['parameters']},{r['compute_budget']},{r['final_loss']}" for r in rows]
    (tmp_path / "runs.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(UsageError, match="--plot needs matplotlib"):
        scaling.main(["fit", str(tmp_path / "runs.csv"), "--samples=5", "--budgets=1e22",
                      f"--plot={tmp_path / 'plots'}"])
    out = capsys.readouterr().out
    assert "N_opt = 0.1332 C^0.5146" in out and "C = 1e+22: N_opt" in out


def test_scaling_bad_runs_files_name_the_file_and_budget(tmp_path, capsys):
    good = _iso_rows(1e18, [1e7, 3e7, 1e8, 3e8], [3.2, 3.0, 3.1, 3.4])
    with pytest.raises(UsageError, match=r"budget 1e\+19 has 2 distinct model sizes"):
        scaling.isoflops_points(scaling.load_runs(_write_runs(
            tmp_path / "few.json", good + _iso_rows(1e19, [1e7, 3e7], [3.0, 2.9]))))
    bad = good[:3] + [{"parameters": -5, "compute_budget": 1e18, "final_loss": 3.0}]
    with pytest.raises(UsageError, match=r"neg\.json: run 4 needs positive finite values"):
        scaling.load_runs(_write_runs(tmp_path / "neg.json", bad))
    with pytest.raises(UsageError, match=r"keys\.json: run 1 needs parameters"):
        scaling.load_runs(_write_runs(tmp_path / "keys.json", [{"parameters": 1}]))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(UsageError, match=r"broken\.json: not valid JSON"):
        scaling.load_runs(tmp_path / "broken.json")
    (tmp_path / "text.csv").write_text("parameters,compute_budget,final_loss\n1e7,1e18,abc\n")
    with pytest.raises(UsageError, match=r"text\.csv: run 1 has a value that is not a number"):
        scaling.load_runs(tmp_path / "text.csv")
    with pytest.raises(UsageError, match="does not exist"):
        scaling.load_runs(tmp_path / "none.json")
    with pytest.raises(UsageError, match=r"budget 1e\+18: the loss has no minimum"):
        scaling.isoflops_points(scaling.load_runs(_write_runs(
            tmp_path / "hill.json", _iso_rows(1e18, [1e7, 3e7, 1e8], [3.0, 3.5, 3.0]))))
    edge = _iso_rows(1e18, [1e7, 3e7, 1e8, 3e8], [3.6, 3.3, 3.1, 3.0])  # still falling at 3e8
    points = scaling.isoflops_points(scaling.load_runs(_write_runs(tmp_path / "edge.json", edge)))
    assert "budget 1e+18: the optimum is at the edge" in points[0].warning
    assert "extrapolation" in points[0].warning and not scaling.isoflops_points(
        scaling.load_runs(_write_runs(tmp_path / "ok.json", good)))[0].warning
    scaling.print_isoflops(points)
    assert "warning: budget 1e+18: the optimum is at the edge" in capsys.readouterr().err
    with pytest.raises(UsageError, match="unknown command 'sweeps'"):
        scaling.main(["sweeps"])
    with pytest.raises(UsageError, match="fit needs a runs file"):
        scaling.main(["fit"])
    with pytest.raises(UsageError, match="--budgets must be positive"):
        scaling.main(["fit", str(tmp_path / "ok.json"), "--budgets=-1,1e23"])


def test_scaling_demo_shows_every_method_recovering_the_law(capsys):
    result = scaling.main(["demo", "--noise=0.002"])
    out = capsys.readouterr().out
    assert result is None and "its optimum N_opt ~ C^0.4516" in out and "approach 1" in out
    assert "approach 3     1.690" in out


def test_scaling_plots_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    runs = scaling.load_runs(scaling.COURSE_RUNS)
    points = scaling.isoflops_points(runs)
    paths = scaling.plot_fits(runs, points, scaling.fit_approach2(points), tmp_path / "plots")
    assert [p.name for p in paths] == ["isoflops.png", "power_laws.png"]
    course_law = LossLaw(E=2.69, A=1606, B=3211, alpha=0.34, beta=0.36)  # the tour's fit
    paths.append(scaling.plot_surface(runs, course_law, tmp_path / "plots"))
    curves = scaling.synthetic_curves(sizes=(1e7, 3e7, 1e8, 3e8, 1e9))
    paths.append(scaling.plot_envelope(curves, tmp_path / "plots"))
    assert [p.name for p in paths[2:]] == ["loss_surface.png", "envelope.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def _sweep_args(cache: Path, runs: Path, *more: str) -> list[str]:
    """Three budgets x three shapes (d_model 16, 32, 48) of 11 to 378 steps each, on pydoc."""
    return ["sweep", "--target=1e11", "--budget=5e10", f"--runs={runs}", "--budgets=2e9,4e9,8e9",
            "--sizes=3", "--min_params=1e4", "--max_params=1.2e5", "--context_length=32",
            "--dataset=pydoc", "--max_text_mb=0.1", "--vocab_size=300", f"--cache_dir={cache}",
            "--batch_size=8", "--eval_iters=2", "--lrs=3e-3", "--device=cpu", "--samples=20",
            "--aspect_ratio=16", "--head_dim=16", *more]


def _no_training(*args, **kwargs):
    raise AssertionError("the sweep trained a run it should not have")


def test_scaling_sweep_trains_within_budget_resumes_and_fits(tmp_path, _cache, capsys,
                                                               monkeypatch):
    runs = tmp_path / "sweep" / "runs.json"
    scaling.main(_sweep_args(_cache, runs))
    out = capsys.readouterr().out
    rows = json.loads(runs.read_text())
    assert len(rows) == 9 and "9 runs" in out and "0 in" in out and "9 to train" in out
    assert {r["d_model"] for r in rows} == {16, 32, 48}
    assert sorted({r["compute_budget"] for r in rows}) == [2e9, 4e9, 8e9]
    assert sum(r["flops"] for r in rows) <= 5e10
    for r in rows:  # tokens D = C / 6N, rounded down to whole steps of 8 x 32 tokens
        assert r["flops"] == 6 * r["parameters"] * r["tokens"] <= r["compute_budget"]
        assert r["tokens"] == r["iterations"] * 8 * 32 and r["lr"] == 3e-3
        assert math.isfinite(r["final_loss"]) and Path(r["out_dir"], "metrics.jsonl").is_file()
    assert "IsoFLOPs (approach 2) on" in out and "approach 3: L(N, D)" in out
    assert "best shape at 1e+11 FLOPs (approach 3's N_opt" in out
    assert "learning rate 0.003 and batch size 8 sequences of 32 tokens" in out
    assert "predicted loss" in out
    # a second invocation finds every run in the file: nothing is trained, the same rows are fitted
    monkeypatch.setattr(train, "train", _no_training)
    fitted = []
    monkeypatch.setattr(scaling, "sweep_report", lambda rows, *args: fitted.append(rows))
    scaling.main(_sweep_args(_cache, runs))
    assert "9 in" in capsys.readouterr().out and fitted == [rows] == [json.loads(runs.read_text())]
    # a sweep killed after 7 runs trains only the 2 missing ones, appending each to the file
    runs.write_text(json.dumps(rows[:7]))
    trained = []

    def fake_train(cfg):
        trained.append(cfg.out_dir)
        return {"val_loss": 9.0, "tokenizer": SimpleNamespace(vocab_size=300)}
    monkeypatch.setattr(train, "train", fake_train)
    scaling.main(_sweep_args(_cache, runs))
    assert trained == [r["out_dir"] for r in rows[7:]]
    assert json.loads(runs.read_text()) == rows[:7] + [{**r, "final_loss": 9.0} for r in rows[7:]]


def test_scaling_sweep_in_processes_equals_in_process_and_checks_the_prediction(tmp_path, _cache,
                                                                                capsys,
                                                                                monkeypatch):
    runs = tmp_path / "sweep" / "runs.json"
    spawned, lock = [], threading.Lock()  # one run as its own process (seconds of imports each)

    def one_process(train_cfg):
        with lock:
            spawned.append(train_cfg.out_dir)
            if len(spawned) > 1:  # the rest here, one at a time: seeded like a process of its own
                return train.train(train_cfg)["val_loss"]
        return subprocess_run(train_cfg)
    subprocess_run = scaling.train_in_subprocess
    monkeypatch.setattr(scaling, "train_in_subprocess", one_process)
    report = scaling.main(_sweep_args(_cache, runs, "--jobs=3", "--check=True", "--target=2e10"))
    out = capsys.readouterr().out
    rows = json.loads(runs.read_text())
    assert len(rows) == 9 and "9 to train, 3 at a time" in out and out.count("loss ") >= 9
    assert sorted(spawned) == sorted(r["out_dir"] for r in rows)
    # a run trained by `python train.py CONFIG` gives what train.train gives in this process
    first = next(r for r in rows if r["out_dir"] == spawned[0])
    assert Path(first["out_dir"], "train.log").is_file()
    cfg = json.loads(Path(first["out_dir"], "config.json").read_text())
    result = train.train(train.with_overrides(train.TrainConfig(), {**cfg, "out_dir": str(
        tmp_path / "again")}))
    assert result["val_loss"] == pytest.approx(first["final_loss"], abs=1e-4)
    # the check: the predicted shape trained at the target, compared with the fits' loss
    [check] = json.loads((tmp_path / "sweep" / "runs-check.json").read_text())
    assert check["compute_budget"] == 2e10 and check["flops"] <= 2e10
    assert check["tokens"] == check["iterations"] * 8 * 32 and math.isfinite(check["final_loss"])
    assert "check at 2e+10 FLOPs (2.5x the largest sweep budget)" in out
    assert f"validation loss {check['final_loss']:.4f}" in out and "approach 3 predicted" in out
    assert report is None  # main prints; the check is kept in its file: a rerun trains nothing
    scaling.main(_sweep_args(_cache, runs, "--jobs=3", "--check=True", "--target=2e10"))
    again = capsys.readouterr().out
    assert "9 in" in again and "1 in" in again and "0 to train" in again
    assert f"validation loss {check['final_loss']:.4f}" in again


def test_scaling_sweep_records_the_other_runs_when_one_fails(tmp_path, _cache, monkeypatch):
    def fake(train_cfg):  # every run of one shape fails; the others finish in any order
        if "-d32-" in train_cfg.out_dir:
            raise RuntimeError("exit status 1: out of memory")
        return 4.0 + train_cfg.max_iters / 1e4
    monkeypatch.setattr(scaling, "train_in_subprocess", fake)
    runs = tmp_path / "runs.json"
    with pytest.raises(RuntimeError, match=r"3 of the sweep's runs failed .*out of memory"):
        scaling.main(_sweep_args(_cache, runs, "--jobs=2"))
    rows = json.loads(runs.read_text())
    assert len(rows) == 6 and {r["d_model"] for r in rows} == {16, 48}
    assert all(r["final_loss"] == 4.0 + r["iterations"] / 1e4 for r in rows)


def test_scaling_sweep_refuses_before_any_work(tmp_path, _cache, monkeypatch):
    monkeypatch.setattr(train, "train", _no_training)
    monkeypatch.setattr(scaling, "prepare_data", _no_training)
    runs = tmp_path / "runs.json"
    with pytest.raises(UsageError, match=r"the sweep's 9 runs need 4\.\d+e\+10 FLOPs, over "
                                         r"--budget=2e\+10"):
        scaling.main(_sweep_args(_cache, runs, "--budget=2e10"))
    with pytest.raises(UsageError, match="the sweep's 18 runs need"):  # two rates: twice the runs
        scaling.main(_sweep_args(_cache, runs, "--lrs=1e-3,3e-3"))
    with pytest.raises(UsageError, match="the sweep's 36 runs need"):  # and two batch sizes
        scaling.main(_sweep_args(_cache, runs, "--lrs=1e-3,3e-3", "--batch_sizes=4,8"))
    with pytest.raises(UsageError, match="--jobs must be at least 1"):
        scaling.main(_sweep_args(_cache, runs, "--jobs=0"))
    plans = []  # batch sizes are swept like rates: every shape at each, priced by its own steps
    monkeypatch.setattr(scaling, "run_sweep", lambda plan, *args: plans.append(plan) or [])
    monkeypatch.setattr(scaling, "sweep_report", lambda *args: {})
    scaling.main(_sweep_args(_cache, runs, "--budget=1e11", "--batch_sizes=4,8"))
    assert sorted({(row["batch_size"], cfg.batch_size) for row, cfg in plans[0]}) == [(4, 4),
                                                                                      (8, 8)]
    assert all(row["tokens"] == row["iterations"] * row["batch_size"] * 32 for row, _ in plans[0])
    assert len({cfg.out_dir for _, cfg in plans[0]}) == len(plans[0]) == 18
    with pytest.raises(UsageError, match=r"budget 2e\+09: 2 shapes of the family"):
        scaling.main(_sweep_args(_cache, runs, "--max_params=5e4"))
    with pytest.raises(UsageError, match="the sweep sets --d_model, --max_iters per run"):
        scaling.main(_sweep_args(_cache, runs, "--d_model=64", "--max_iters=5"))
    with pytest.raises(UsageError, match="--lrs must be positive"):
        scaling.main(_sweep_args(_cache, runs, "--lrs=fast"))
    assert not runs.exists()


# =================================================================================================
# data.py
# =================================================================================================

import data  # noqa: E402


def test_data_mask_emails_phones_ips_and_near_misses():
    text, n = data.mask_emails("mail first.last+tag@mail.example.co.uk or a@b.com.")
    assert (text, n) == ("mail |||EMAIL_ADDRESS||| or |||EMAIL_ADDRESS|||.", 2)
    for miss in ("user@localhost", "@x.com", "a@b", "x@y.c"):
        assert data.mask_emails(miss) == (miss, 0)
    for phone in ("2831823829", "(283)-182-3829", "(283) 182 3829", "283-182-3829",
                  "283.182.3829", "+1 283 182 3829", "+1-283-182-3829", "+44 20 7946 0958",
                  "+33 1 23 45 67 89"):
        assert data.mask_phone_numbers(f"call {phone}.") == ("call |||PHONE_NUMBER|||.", 1), phone
    for miss in ("182-3829", "28318238", "283-182-38291", "id 123456789012345", "2024-01-15",
                 "$12.99", "ISBN 978-3-16-148410-0"):
        assert data.mask_phone_numbers(miss) == (miss, 0), miss
    assert data.mask_ips("hosts 1.2.3.4, 192.168.0.255 and 0.0.0.0") == (
        "hosts |||IP_ADDRESS|||, |||IP_ADDRESS||| and |||IP_ADDRESS|||", 3)
    assert data.mask_ips("at 10.0.0.1.") == ("at |||IP_ADDRESS|||.", 1)
    for miss in ("256.1.1.1", "1.2.3.4.5", "1.2.3", "300.1.1.1", "01.2.3.4", "v1.2.3.4"):
        assert data.mask_ips(miss) == (miss, 0), miss
    masked, counts = data.mask_pii("a@b.com 283-182-3829 8.8.8.8")
    assert counts == {"emails": 1, "phones": 1, "ips": 1}
    assert data.mask_pii(masked) == (masked, {"emails": 0, "phones": 0, "ips": 0})  # no recount


def test_data_gopher_rules_each_at_its_boundary():
    rules = list(data.gopher_rules("word " * 50))
    words, length, ellipsis, alphabetic = rules

    def failing(text: str) -> list[str]:
        return [rule for rule, ok in data.gopher_rules(text).items() if not ok]

    assert failing("word " * 50) == [] and data.gopher_quality_filter("word " * 50)
    assert failing("word " * 49) == [words] and not data.gopher_quality_filter("word " * 49)
    assert failing("word " * 100_000) == [] and failing("word " * 100_001) == [words]
    assert failing("abc " * 60) == [] and failing("ab " * 60) == [length]  # mean 3 / 2
    assert failing("abcdefghij " * 60) == [] and failing("abcdefghijk " * 60) == [length]
    lines = ["some words here ..."] * 3 + ["some more words here"] * 7  # 30% pass, 40% fail
    assert failing("\n".join(lines * 5)) == []
    assert failing("\n".join((["end \u2026"] * 4 + ["some more words here"] * 6) * 5)) == [ellipsis]
    assert failing("word " * 80 + "123 " * 20) == []
    assert failing("word " * 79 + "123 " * 21) == [alphabetic]


def test_data_exact_line_dedup_keeps_lines_seen_once(tmp_path):
    (tmp_path / "in").mkdir()
    a = tmp_path / "in" / "a.txt"
    b = tmp_path / "in" / "b.txt"
    a.write_text("cookie notice\nonly in a\nrepeated\nrepeated\n")
    b.write_text("only in b\ncookie notice")  # the last line has no newline: still the same line
    removed = data.exact_line_deduplication([a, b], tmp_path / "out")
    assert removed == 4
    assert (tmp_path / "out" / "a.txt").read_text() == "only in a\n"
    assert (tmp_path / "out" / "b.txt").read_text() == "only in b\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt"]  # no .tmp


def _near_duplicate_corpus() -> list[str]:
    rng = random.Random(0)
    docs = [" ".join(rng.choice(data.WORDS) + str(rng.randint(0, 9)) for _ in range(200))
            for _ in range(6)]
    words = docs[0].split()
    edited = words[:100] + ["inserted"] + words[100:]  # Jaccard ~0.97 with docs[0]
    half = words[:100] + docs[1].split()[:100]  # Jaccard ~0.33 with each of docs[0], docs[1]
    punctuated = docs[2].upper().replace(" ", ", ", 20) + "!"  # normalises to docs[2] exactly
    return docs + [" ".join(edited), " ".join(half), punctuated, docs[3]]


def test_data_minhash_signature_equals_reference():
    a, b = data.hash_functions(64, seed=3)
    shingle_set = data.shingles("The quick brown fox jumps over the lazy dog again and again", 3)
    fast = data.minhash_signature(shingle_set, a, b, chunk=4)  # several chunks
    assert fast.tolist() == data.minhash_signature_reference(shingle_set, a, b)
    assert data.normalize_text("  Café, DÉJÀ-vu!\n") == "cafe deja vu"


def test_data_minhash_dedup_equals_brute_force_and_keeps_one_per_cluster(tmp_path):
    texts = _near_duplicate_corpus()
    sets = [data.shingles(t, 3) for t in texts]
    assert data.jaccard(sets[0], sets[6]) > 0.9 and data.jaccard(sets[0], sets[7]) < 0.4
    expected = [[0, 6], [1], [2, 8], [3, 9], [4], [5], [7]]
    assert data.near_duplicate_clusters_reference(texts, 3, 0.8) == expected
    assert data.minhash_clusters(texts, 100, 20, 3, 0.8) == expected
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(text)
    kept = data.minhash_deduplication(paths, 100, 20, 3, 0.8, tmp_path / "out", seed=0)
    kept_ids = sorted(int(p.stem[3:]) for p in kept)
    assert len(kept_ids) == len(expected)
    assert all(len(set(cluster) & set(kept_ids)) == 1 for cluster in expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in kept)
    assert data.minhash_deduplication(paths, 100, 20, 3, 0.8, tmp_path / "again") == kept
    with pytest.raises(UsageError, match="equal bands"):
        data.minhash_clusters(texts, 100, 30, 3, 0.8)


def test_data_warc_round_trip_gzip_and_plain(tmp_path, capsys):
    records = data.synthetic_crawl()[:3]
    info = data.WarcRecord({"WARC-Type": "warcinfo", "Content-Length": "9"}, b"software:")
    for name in ("crawl.warc.gz", "crawl.warc"):
        data.write_warc(tmp_path / name, [info, *records])
        back = list(data.iter_warc_records(tmp_path / name))
        assert back == [dataclasses.replace(info, body=info.payload), *records]
    assert back[1].http_headers["content-type"] == "text/html"
    assert back[1].body.startswith(b"<html>") and back[1].url.endswith("/0")
    assert data.extract_record(back[0]) is None and data.extract_record(back[1]).startswith("Art")
    wet = data.WarcRecord({"WARC-Type": "conversion"}, "plain caf\u00e9\n".encode(), body=b"")
    data.write_warc(tmp_path / "crawl.wet", [wet])
    [wet_back] = data.iter_warc_records(tmp_path / "crawl.wet")
    assert data.extract_record(wet_back) == "plain caf\u00e9"
    raw = (tmp_path / "crawl.warc.gz").read_bytes()
    (tmp_path / "cut.warc.gz").write_bytes(raw[:len(raw) * 2 // 3])
    assert 1 <= len(list(data.iter_warc_records(tmp_path / "cut.warc.gz"))) < 4
    assert "ends early" in capsys.readouterr().err


def test_data_extraction_drops_boilerplate_and_survives_bad_bytes():
    page = (b"<html><head><title>T</title><style>p {color: red}</style></head><body>"
            b"<nav><a>Home</a></nav><script>if (a < b) alert('x')</script>"
            b"<h1>Heading</h1><p>First   paragraph\n with &amp; entity.</p>"
            b"<ul><li>one</li><li>two</li></ul><footer>Copyright</footer></body></html>")
    assert data.extract_text_from_html_bytes(page) == (
        "Heading\nFirst paragraph with & entity.\none\ntwo")
    assert data.extract_text_from_html_bytes(b"<script>x()</script>") is None
    latin = "<meta charset='iso-8859-1'><p>caf\u00e9 \u00e0 la cr\u00e8me</p>".encode("latin-1")
    assert data.extract_text_from_html_bytes(latin) == "caf\u00e9 \u00e0 la cr\u00e8me"
    privet = "\u043f\u0440\u0438\u0432\u0435\u0442"  # declared only in the HTTP header
    koi8 = f"<p>{privet}</p>".encode("koi8-r")
    assert data.extract_text_from_html_bytes(koi8, "koi8-r") == privet
    bad = b"<p>ok \xff\xfe\x81 bytes</p><meta charset='no-such-codec'>"
    assert data.extract_text_from_html_bytes(bad).startswith("ok ")  # never raises


import gzip  # noqa: E402

SAMPLES = {  # short sentences, none of them in data.py's word lists verbatim
    "en": "The children walked to school along the river in the morning.",
    "de": "Die Kinder gehen am Morgen mit ihren Freunden in die Schule.",
    "fr": "Les enfants vont à l'école avec leurs amis tous les matins.",
    "es": "Los niños van a la escuela con sus amigos todas las mañanas.",
    "pt": "As crianças vão para a escola com os seus amigos todas as manhãs.",
    "it": "I bambini vanno a scuola con i loro amici ogni mattina.",
    "zh": "孩子们每天早上和朋友一起去学校。",
    "ja": "子供たちは毎朝友達と一緒に学校へ行きます。",
    "ko": "아이들은 매일 아침 친구들과 함께 학교에 갑니다.",
    "ru": "Дети каждое утро ходят в школу вместе с друзьями.",
    "ar": "يذهب الأطفال إلى المدرسة مع أصدقائهم كل صباح.",
}


def test_data_identify_language_builtin_and_trained():
    for lang, text in SAMPLES.items():
        found, score = data.identify_language(text)
        assert found == lang and 0.5 < score <= 1.0, (lang, found, score)
    assert data.identify_language("12345 !!! 678") == ("unknown", 0.0)
    lang, score = data.identify_language(SAMPLES["en"] + " 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15")
    assert lang == "en" and score < data.identify_language(SAMPLES["en"])[1]  # digits dilute it
    lines = [f"__label__{lang} {text}" for lang, text in SAMPLES.items() if lang in ("en", "de")]
    model = data.NaiveBayesLanguageId(lines * 3)  # a user's own labelled text
    assert model.predict("die Schule")[0] == "de" and model.predict("the school")[0] == "en"
    assert data.identify_language("the school", model)[0] == "en"
    with pytest.raises(ValueError, match="__label__X"):
        data.NaiveBayesLanguageId(["en no label here"])


def _toy_lines(rng: random.Random, n: int) -> list[str]:
    """Two classes told apart only by which words they use: a linear model must get them all."""
    animals, tools = "cat dog horse sheep goat cow".split(), "hammer saw drill wrench file".split()
    return [f"__label__{label} " + " ".join(rng.choice(words) for _ in range(6))
            for _ in range(n) for label, words in (("animal", animals), ("tool", tools))]


def test_data_fasttext_classifier_learns_and_round_trips(tmp_path):
    rng = random.Random(0)
    model = data.FastTextClassifier.train(_toy_lines(rng, 60), epochs=5, buckets=1 << 12)
    test = data.read_labelled(_toy_lines(rng, 20))
    assert all(model.predict(text)[0] == label for label, text in test)
    assert model.predict("dog cow sheep")[1] > 0.9
    model.save(tmp_path / "m.npz")
    back = data.FastTextClassifier.load(tmp_path / "m.npz")
    assert back.labels == model.labels and back.config == model.config
    assert back.predict("saw a cat") == model.predict("saw a cat")
    np.testing.assert_array_equal(back.embeddings, model.embeddings)
    (tmp_path / "official.bin").write_bytes((793712314).to_bytes(4, "little") + bytes(16))
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    for name in ("official.bin", "junk.npz", "other.npz"):  # a fastText .bin, junk, another .npz
        with pytest.raises(ValueError, match="not a classifier saved by data.py"):
            data.FastTextClassifier.load(tmp_path / name)
    quality = data.FastTextClassifier.train(["__label__wiki the history of the valley",
                                             "__label__cc buy cheap pills now"] * 20)
    assert data.classify_quality("a history of the valley", quality)[0] == "wiki"
    with pytest.raises(ValueError, match="expected \\['nsfw', 'non-nsfw'\\]"):
        data.classify_nsfw("text", quality)


def test_data_bloom_filter_false_positive_rate_near_target():
    n, p = 3000, 0.02
    bloom = data.BloomFilter(n, p)
    assert bloom.num_bits == math.ceil(-n * math.log(p) / math.log(2) ** 2)
    assert bloom.num_hashes == round(bloom.num_bits / n * math.log(2)) == 6
    assert sum(bloom.add(f"item {i}") for i in range(n)) < n * p  # "seen" while filling: rare
    assert all(f"item {i}" in bloom for i in range(n))  # and never a false negative
    measured = np.mean([f"other {i}" in bloom for i in range(20_000)])
    assert p / 2 < measured < p * 1.5, measured
    kept = list(data.bloom_line_deduplication(["a\nb\nc", "b\nd", "a\nc"],
                                              data.BloomFilter(10, 1e-6)))
    assert kept == ["a\nb\nc", "d", ""]  # first copies stay
    with pytest.raises(ValueError, match="false_positive_rate"):
        data.BloomFilter(10, 1.5)


def test_data_contamination_finds_planted_overlaps():
    rng = random.Random(0)
    train_docs = [" ".join(rng.choice(data.WORDS) for _ in range(100)) for _ in range(20)]
    questions = [" ".join(rng.choice(data.WORDS) for _ in range(30)) for _ in range(5)]
    train_docs[3] += " " + questions[1].upper() + "!"  # normalisation must still see it
    train_docs[7] = " ".join(questions[4].split()[5:20]) + " " + train_docs[7]  # a 15-word span
    train_docs[9] += " " + " ".join(questions[2].split()[:12])  # 12 words: below 13, not found
    assert data.contamination(train_docs, questions) == {3: {1}, 7: {4}}
    assert data.contamination(train_docs, questions, ngrams=12)[9] == {2}


def write_bad_crawl(folder) -> None:
    """bad.warc.gz: good pages around an unknown charset, an empty page and a record with a wrong
    Content-Length; cut.warc.gz: a good page, then a gzip member cut in half."""
    rng = random.Random(1)
    good = [data.make_response_record(f"https://other.example/{i}",
                                      data._page(f"Other {i}", data._article(rng)), record_id=i)
            for i in range(3)]
    odd = [data.make_response_record("https://other.example/charset",
                                     b"<meta charset='x-mystery'><p>caf\xe9 \xe0 la cr\xe8me</p>"),
           data.make_response_record("https://other.example/empty", b"<script>x()</script>")]
    parts = []
    for records in ([good[0], *odd], [good[1]], [good[2]]):
        data.write_warc(folder / "part.tmp", records)
        parts.append(gzip.compress((folder / "part.tmp").read_bytes(), mtime=0))
    (folder / "part.tmp").unlink()
    wrong = {**good[1].headers, "Content-Length": str(len(good[1].payload) - 100)}
    head = "WARC/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in wrong.items()) + "\r\n"
    bad = gzip.compress(head.encode() + good[1].payload + b"\r\n\r\n", mtime=0)
    (folder / "bad.warc.gz").write_bytes(parts[0] + bad + parts[1])
    (folder / "cut.warc.gz").write_bytes(parts[2] + parts[2][:len(parts[2]) // 2])


def _run_pipeline(tmp_path, **overrides) -> dict:
    crawl = tmp_path / "crawl"
    crawl.mkdir(exist_ok=True)
    records = data.synthetic_crawl()
    data.write_warc(crawl / "part0.warc.gz", records[:9])
    data.write_warc(crawl / "part1.warc.gz", records[9:])
    write_bad_crawl(crawl)
    cfg = {**data.PIPELINE_OPTIONS, "vocab_size": 300, **overrides}
    return data.pipeline(str(crawl), str(tmp_path / cfg.pop("name", "out")), progress=False,
                         **cfg)


def test_data_pipeline_removes_what_it_should_and_feeds_train(tmp_path, capsys):
    report = _run_pipeline(tmp_path, workers=1)
    assert dict(report["removed"]) == {"bad input": 3, "no text": 1, "language": 6,
                                       "gopher rules": 3, "near-duplicates": 2,
                                       "repeated lines": 0}
    assert dict(report["errors"]) == {"unknown charset": 1, "wrong Content-Length": 1,
                                      "file cut short or unreadable": 1}
    assert dict(report["pii"]) == {"emails": 2, "phones": 2, "ips": 1}
    assert report["kept"] == 11 and report["tokens"]["repeated lines"] > 0
    out = tmp_path / "out"
    train_text = (out / "train.txt").read_text()
    assert "Share this story" not in train_text and "|||EMAIL_ADDRESS|||" in train_text
    assert "Bauern" not in train_text and "$" not in train_text
    assert train_text.count(data.EOT) + (out / "val.txt").read_text().count(data.EOT) == 11
    tok = Tokenizer.from_dir(out / "tokenizer")
    for split in ("train", "val"):
        tokens = train.load_tokens(out / f"{split}.bin", tok)  # what --train_bin/--val_bin read
        assert len(tokens) == report["bin_tokens"][split] > 0
        assert tok.decode(tokens.tolist()) == (out / f"{split}.txt").read_text()
    assert json.loads((out / "report.json").read_text())["kept"] == 11
    printed = capsys.readouterr()
    assert "near-duplicates" in printed.out and "not its length: skipped" in printed.err


def test_data_pipeline_shards_classifiers_and_contamination(tmp_path, capsys):
    quality = data.FastTextClassifier.train(
        [f"__label__wiki {' '.join(data._article(random.Random(i), 4))}" for i in range(40)]
        + [f"__label__cc {' '.join(random.Random(i).choices(data.SPAM, k=30))}"
           for i in range(40)], buckets=1 << 14)
    quality.save(tmp_path / "quality.npz")
    article5 = data.extract_record(data.synthetic_crawl()[5]).splitlines()[2]
    (tmp_path / "eval.txt").write_text(f"{article5}\n")
    opts = dict(quality=str(tmp_path / "quality.npz"), eval=str(tmp_path / "eval.txt"),
                line_dedup="bloom")
    for shard in ("0/2", "1/2"):
        assert _run_pipeline(tmp_path, workers=1, shard=shard, name="sharded", **opts) is None
    merged = _run_pipeline(tmp_path, workers=2, merge=True, name="sharded", **opts)
    assert merged["removed"]["quality"] == 1 and merged["removed"]["contamination"] == 1
    assert merged["kept"] == 9  # 11, less the spam page and the quoted article
    assert "Share this story" in (tmp_path / "sharded" / "train.txt").read_text() + (
        tmp_path / "sharded" / "val.txt").read_text()  # bloom keeps the first copy
    whole = _run_pipeline(tmp_path, workers=1, name="whole", **opts)
    assert {k: whole[k] for k in ("removed", "kept", "pii")} == {
        k: merged[k] for k in ("removed", "kept", "pii")}
    with pytest.raises(UsageError, match="0 <= i < n"):
        _run_pipeline(tmp_path, shard="2/2")
    with pytest.raises(UsageError, match="--quality=nowhere.npz does not exist"):
        _run_pipeline(tmp_path, quality="nowhere.npz")


def test_data_line_dedup_counts_a_line_repeated_inside_one_document(tmp_path):
    """Page 0 has a line twice, every page "Share this story...": Bloom keeps first copies and
    counts the tokens of the rest, exact dedup drops and counts every copy."""
    rng, repeated = random.Random(3), "Subscribe to our letter for more stories."
    pages = [data._page(f"Story {i}", data._article(rng) + [repeated] * (2 if i == 0 else 0))
             for i in range(3)]
    data.write_warc(tmp_path / "crawl.warc", [data.make_response_record(
        f"https://valley.example/{i}", page, record_id=i) for i, page in enumerate(pages)])
    share = "Share this story with your friends."

    def tokens(*lines: str) -> int:  # what a document's removed lines count, joined
        return len(data.PRETOKEN_RE.findall("\n".join(lines)))

    for mode, expected in (("bloom", tokens(repeated) + 2 * tokens(share)),
                           ("exact", tokens(repeated, repeated, share) + 2 * tokens(share))):
        report = data.pipeline(str(tmp_path / "crawl.warc"), str(tmp_path / mode),
                               progress=False, **{**data.PIPELINE_OPTIONS, "line_dedup": mode,
                                                  "vocab_size": 300})
        assert report["kept"] == 3 and report["removed"]["repeated lines"] == 0
        assert report["tokens"]["repeated lines"] == expected, mode
        text = "".join((tmp_path / mode / f"{s}.txt").read_text() for s in ("train", "val"))
        assert text.count(repeated) == (mode == "bloom") and text.count(share) == (mode == "bloom")


def test_data_pipeline_demo_and_commands(tmp_path, capsys):
    """Replaces test_data_demo_and_commands (the demo now runs the pipeline; extract and dedup
    commands gave way to `pipeline`, the functions behind them stay)."""
    report = data.demo(str(tmp_path / "demo"))
    assert report["removed"]["quality"] == 1 and report["removed"]["contamination"] == 1
    assert report["kept"] == 6 and report["removed"]["language"] == 6
    out = capsys.readouterr().out
    assert "near-duplicates" in out and "cc 0." in out and "|||" not in out.split("kept")[0]


def test_data_pipeline_command_line(tmp_path):
    (crawl := tmp_path / "crawl").mkdir()
    records = data.synthetic_crawl()
    data.write_warc(crawl / "part0.warc.gz", records[:9])
    data.write_warc(crawl / "part1.warc.gz", records[9:])
    data.main(["pipeline", f"--input={crawl}/*.warc.gz", f"--out={tmp_path / 'cli'}",
               "--workers=1", "--languages=", "--line_dedup=none", "--vocab_size=300"])
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert "language" not in report["removed"] and report["removed"]["gopher rules"] == 5
    assert report["kept"] == 12  # 19 pages - 2 near-duplicates - 5 (zh, ja: no spaces, "1 word")
    with pytest.raises(UsageError, match="did you mean --num_hashes"):
        data.main(["pipeline", "--input=x", "--out=y", "--num_hash=3"])
    with pytest.raises(UsageError, match="pipeline needs --input"):
        data.main(["pipeline", "--out=y"])
    with pytest.raises(UsageError, match="line_dedup must be"):
        data.main(["pipeline", "--input=x", "--out=y", "--line_dedup=fuzzy"])
    with pytest.raises(UsageError, match="no shard outputs"):
        data.main(["pipeline", f"--out={tmp_path / 'empty'}", "--merge"])


def test_data_bad_input_is_counted_not_fatal(tmp_path, capsys):
    from collections import Counter
    (tmp_path / "notes.warc").write_text("hello\nworld\n")  # not WARC at all
    record = data.make_response_record("https://x.example/1", b"<p>text</p>")
    no_length = b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: many\r\n\r\n"
    (tmp_path / "odd.warc").write_bytes(no_length + record.payload + b"\r\n\r\n")
    with open(tmp_path / "odd.warc", "ab") as f:  # a good record after the bad one survives
        data.write_warc(tmp_path / "good.warc", [record])
        f.write((tmp_path / "good.warc").read_bytes())
    errors = Counter()
    assert list(data.iter_warc_records(tmp_path / "notes.warc", errors)) == []
    assert [r.url for r in data.iter_warc_records(tmp_path / "odd.warc", errors)] == [record.url]
    assert errors == {"not a WARC record": 1, "wrong Content-Length": 1}
    assert "skipped" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown charset 'x-nope'"):
        data.extract_text_from_html_bytes(b"<meta charset='x-nope'><p>\xe9</p>", strict=True)
    page = b"<meta charset='x-nope'><p>ok</p>"
    assert data.extract_text_from_html_bytes(page, strict=True) == "ok"
    (tmp_path / "junk.npz").write_bytes(b"junk")
    toxic = data.FastTextClassifier.train(["__label__toxic a b", "__label__non-toxic c d"])
    toxic.save(tmp_path / "toxic.npz")
    for quality, message in (("junk.npz", "not a classifier"), ("toxic.npz", "labels are")):
        with pytest.raises(ValueError, match=message):  # before any page is read
            _run_pipeline(tmp_path, quality=str(tmp_path / quality))
    assert not (tmp_path / "out").exists()


def test_data_trained_models_replace_the_builtin_language_id():
    lines = [f"__label__{lang} {text}" for lang, text in SAMPLES.items()] * 5
    model = data.FastTextClassifier.train(lines, epochs=50, minn=1, maxn=3, word_ngrams=1,
                                          buckets=1 << 14)  # char 1-3 grams, as langid tools
    assert all(data.identify_language(text, model)[0] == lang for lang, text in SAMPLES.items())
    assert data.identify_language(SAMPLES["ja"], data.NaiveBayesLanguageId(lines))[0] == "ja"


def test_data_kneser_ney_sums_to_one_and_prefers_its_domain():
    rng = random.Random(0)
    docs = ["\n".join(data._article(rng)) for _ in range(30)]
    lm = data.KneserNeyLM(docs, order=3)
    assert "<unk>" in lm.vocab and "</s>" in lm.vocab
    for context in ([], ["the"], ["of", "the"], ["never", "seen"], ["river", "zzz"]):
        assert sum(lm.prob(w, context) for w in lm.vocab) == pytest.approx(1.0, abs=1e-9)
    assert lm.prob("qwerty", ["the"]) == lm.prob("<unk>", ["the"]) > 0
    in_domain = "\n".join(data._article(random.Random(1)))
    other = "Notre café propose un menu déjà célèbre dans la vallée avec des crêpes."
    assert lm.perplexity(in_domain) < lm.perplexity(other) / 5
    assert lm.perplexity("") == math.inf


def test_data_dsir_prefers_target_like_documents():
    rng = random.Random(0)
    target = ["\n".join(data._article(rng)) for _ in range(20)]
    good = ["\n".join(data._article(rng)) for _ in range(10)]
    spam = [" ".join(rng.choice(data.SPAM) for _ in range(80)) for _ in range(30)]
    raw = spam[:15] + good + spam[15:]
    weights = data.dsir_log_weights(raw, target)
    assert weights[15:25].min() > max(weights[:15].max(), weights[25:].max())
    assert data.dsir_resample(raw, target, 10, seed=0) == list(range(15, 25))


def test_data_bench_runs(capsys):
    data.bench(crawls=2, repeat=1)
    out = capsys.readouterr().out
    assert "MinHash x128: data.py" in out and "documents/s" in out
    assert "pipeline stage 1, 1 worker process(es)" in out


def test_data_compare_runs(tmp_path, capsys):
    ppl = data.compare(str(tmp_path), crawls=3, max_iters=2, batch_size=2)
    assert set(ppl) == {"unfiltered", "filtered"} and all(math.isfinite(p) for p in ppl.values())


import struct  # noqa: E402


def write_fasttext_bin(path, words: list[bytes], labels: list[tuple[bytes, int]],
                       input_matrix: np.ndarray, output: np.ndarray, *, loss: int = 3,
                       model: int = 3, minn: int = 2, maxn: int = 3, word_ngrams: int = 2,
                       bucket: int = 40, version: int = 12, quantized: bool = False) -> None:
    """A model file in fastText's own layout, written here field by field."""
    args = [input_matrix.shape[1], 5, 5, 1, 5, word_ngrams, loss, model, bucket, minn, maxn, 100]
    out = [struct.pack("<2i", 793712314, version), struct.pack("<12i", *args),
           struct.pack("<d", 1e-4), struct.pack("<3i2q", len(words) + len(labels), len(words),
                                                 len(labels), 1000, -1)]
    for word, count, kind in [(w, 10, 0) for w in words] + [(w, c, 1) for w, c in labels]:
        out.append(word + b"\0" + struct.pack("<qb", count, kind))
    for flag, matrix in ((quantized, input_matrix), (False, output)):
        out += [struct.pack("<?", flag), struct.pack("<2q", *matrix.shape),
                matrix.astype("<f4").tobytes()]
    path.write_bytes(b"".join(out))


def fnv_reference(data_bytes: bytes) -> int:
    """FNV-1a over signed chars, as fastText's C++ computes it, with numpy's wrapping uint32."""
    h = np.uint32(2166136261)
    for byte in np.frombuffer(data_bytes, np.int8):
        h = np.uint32((int(h) ^ (int(byte) & 0xFFFFFFFF)) * 16777619 % 2**32)
    return int(h)


def brute_force_ids(text: str, word_ids: dict[str, int], nwords: int, minn: int, maxn: int,
                    word_ngrams: int, bucket: int) -> list[int]:
    """fastText's input rows for one line, from its description, on characters (not bytes)."""
    tokens = [t for t in text.split() if not t.startswith("__label__")] + ["</s>"]
    ids = []
    for token in tokens:
        if token in word_ids:
            ids.append(word_ids[token])
        if token != "</s>":
            chars = f"<{token}>"
            ids += [nwords + fnv_reference(chars[i:i + n].encode()) % bucket
                    for n in range(minn, maxn + 1) for i in range(len(chars) - n + 1)
                    if chars[i:i + n] not in ("<", ">")]
    hashes = [int(np.uint32(fnv_reference(t.encode())).view(np.int32)) for t in tokens]
    for i in range(len(tokens)):
        for n in range(2, word_ngrams + 1):
            if i + n <= len(tokens):
                h = np.uint64(hashes[i] % 2**64)
                for j in range(i + 1, i + n):
                    h = np.uint64((int(h) * 116049371 + hashes[j]) % 2**64)
                ids.append(nwords + int(h) % bucket)
    return ids


WORDS = [b"</s>", b"cat", b"dog", "caf\u00e9".encode(), b"saw"]
LABELS = [(b"__label__animal", 50), (b"__label__tool", 30), (b"__label__other", 20)]


def test_data_fnv1a_known_answers_and_signed_bytes():
    assert data.fnv1a(b"") == 0x811C9DC5 and data.fnv1a(b"a") == 0xE40C292C  # textbook vectors
    assert data.fnv1a(b"foobar") == 0xBF9CF968
    for word in ("caf\u00e9", "\u732b", "\u043a\u043b\u044e\u0447"):  # bytes >= 128
        assert data.fnv1a(word.encode()) == fnv_reference(word.encode())


@pytest.mark.parametrize("loss", [3, 1, 4])  # softmax, hierarchical softmax, one-vs-all
def test_data_fasttext_bin_predicts_as_brute_force(tmp_path, loss):
    rng = np.random.default_rng(loss)
    bucket, dim = 40, 6
    inputs = rng.normal(size=(len(WORDS) + bucket, dim)).astype(np.float32)
    output = rng.normal(size=(len(LABELS) - (loss == 1), dim)).astype(np.float32)
    write_fasttext_bin(tmp_path / "m.bin", WORDS, LABELS, inputs, output, loss=loss)
    model = data.FastTextClassifier.load(tmp_path / "m.bin")
    assert model.labels == ["animal", "tool", "other"]
    word_ids = {w.decode(): i for i, w in enumerate(WORDS)}
    for text in ("cat dog", "caf\u00e9 saw  unknown\tcat", "", "__label__tool dog", "\u732b x"):
        ids = brute_force_ids(text, word_ids, len(WORDS), 2, 3, 2, bucket)
        assert sorted(model.features(text)) == sorted(ids), text
        logits = output.astype(np.float64) @ inputs[ids].astype(np.float64).mean(0)
        sigmoid = 1 / (1 + np.exp(-logits))
        if loss == 3:
            p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        elif loss == 4:  # fastText's sigmoid table: 513 entries over [-8, 8]
            table = 1 / (1 + np.exp(-(np.arange(513) * 16 / 512 - 8)))
            index = ((np.clip(logits, -8, 8) + 8) * 512 / 16).astype(int)
            p = np.where(logits < -8, 0, np.where(logits > 8, 1, table[index]))
            assert np.abs(p - sigmoid).max() < 0.01
        else:  # Huffman on counts 50, 30, 20: node 3 = (other, tool), root 4 = (node 3, animal)
            p = np.array([sigmoid[1], (1 - sigmoid[1]) * sigmoid[0],
                          (1 - sigmoid[1]) * (1 - sigmoid[0])])
            assert p.sum() == pytest.approx(1)
        label, score = model.predict(text)
        assert label == model.labels[p.argmax()] and score == pytest.approx(p.max(), abs=1e-5)


def test_data_fasttext_bin_plugs_into_language_id_and_classifiers(tmp_path):
    rng = np.random.default_rng(0)
    words = [b"</s>", b"the", b"der"]
    inputs = np.zeros((3 + 10, 2), np.float32)
    inputs[1], inputs[2] = [5, 0], [0, 5]  # "the" points to en, "der" to de
    write_fasttext_bin(tmp_path / "lid.bin", words, [(b"__label__en", 2), (b"__label__de", 1)],
                       inputs, np.eye(2, dtype=np.float32), minn=0, maxn=0, word_ngrams=1,
                       bucket=10)
    assert data.identify_language("the the\nthe", str(tmp_path / "lid.bin"))[0] == "en"
    assert data.identify_language("der der", tmp_path / "lid.bin")[0] == "de"
    write_fasttext_bin(tmp_path / "nsfw.bin", words, [(b"__label__nsfw", 2),
                                                        (b"__label__non-nsfw", 1)],
                       inputs, rng.normal(size=(2, 2)).astype(np.float32), minn=0, maxn=0,
                       bucket=10)
    write_fasttext_bin(tmp_path / "rows.bin", words, [(b"__label__a", 1)], inputs,
                       np.eye(1, 2, dtype=np.float32))  # 40 buckets, 10 rows
    with pytest.raises(ValueError, match="13 input rows for 3 words and 40 buckets"):
        data.FastTextClassifier.load(tmp_path / "rows.bin")
    assert data.classify_nsfw("the text", tmp_path / "nsfw.bin")[0] in ("nsfw", "non-nsfw")
    with pytest.raises(ValueError, match="expected \\['toxic', 'non-toxic'\\]"):
        data.classify_toxic_speech("text", tmp_path / "nsfw.bin")
    for name, kwargs, message in (("q.ftz", dict(quantized=True), "quantized"),
                                  ("vec.bin", dict(model=1), "word-vector"),
                                  ("old.bin", dict(version=10), "version")):
        write_fasttext_bin(tmp_path / name, words, [(b"__label__a", 1)], inputs,
                           np.eye(1, 2, dtype=np.float32), bucket=10, **kwargs)
        with pytest.raises(ValueError, match=message):
            data.FastTextClassifier.load(tmp_path / name)
    raw = (tmp_path / "lid.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match="not a classifier saved by data.py or fastText"):
        data.FastTextClassifier.load(tmp_path / "cut.bin")


def test_data_pipeline_reads_a_fasttext_language_model(tmp_path):
    inputs = np.zeros((1 + 10, 2), np.float32)
    write_fasttext_bin(tmp_path / "lid.bin", [b"</s>"], [(b"__label__de", 1), (b"__label__en", 1)],
                       inputs, np.array([[1, 0], [0, 0]], np.float32), minn=0, maxn=0, bucket=10)
    (crawl := tmp_path / "crawl").mkdir()
    data.write_warc(crawl / "c.warc.gz", data.synthetic_crawl()[:6])  # English pages
    with pytest.raises(ValueError, match="only 0 document"):  # every page is "de" for this one
        data.pipeline(str(crawl), str(tmp_path / "out"), 1, progress=False,
                      **{**data.PIPELINE_OPTIONS, "lid_model": str(tmp_path / "lid.bin")})
    with pytest.raises(UsageError, match="--lid_model=nowhere.bin does not exist"):
        data.pipeline(str(crawl), str(tmp_path / "out"), 1, progress=False,
                      **{**data.PIPELINE_OPTIONS, "lid_model": "nowhere.bin"})


def test_data_fasttext_bin_equals_the_fasttext_package(tmp_path):
    fasttext = pytest.importorskip("fasttext")
    vocab = "cat dog caf\u00e9 \u732b hammer saw \u043a\u043b\u044e\u0447 rain ni\u00f1o".split()
    texts = ["cat dog", "saw caf\u00e9 \u043a\u043b\u044e\u0447\u0438", "unseen", "",
             "rain\tni\u00f1o  x", "\u732b\u732b hammer"]
    words = [b"</s>"] + [w.encode() for w in vocab]
    labels = [(b"__label__a", 30), (b"__label__b", 20), (b"__label__c", 20), (b"__label__d", 5)]
    inputs = np.random.default_rng(0).normal(size=(len(words) + 50, 8)).astype(np.float32)
    paths = []
    for loss in (3, 1, 4):  # softmax, hs (fastText builds its tree), ova
        paths.append(tmp_path / f"loss{loss}.bin")
        output = np.random.default_rng(loss).normal(size=(4 - (loss == 1), 8))
        write_fasttext_bin(paths[-1], words, labels, inputs, output, loss=loss, minn=2, maxn=4,
                           bucket=50)
    for path in paths:
        theirs, ours = fasttext.load_model(str(path)), data.FastTextClassifier.load(path)
        for text in texts:
            (label,), (score,) = theirs.predict(text)
            assert ours.predict(text) == (label[9:], pytest.approx(score, abs=1e-4)), (path, text)


_PAGE = (b"<html><body><nav>Home</nav><script>alert('x')</script><h1>Heading</h1>"
         b"<p>First paragraph of the article, long enough to be the main content of the page. "
         b"It goes on for a while, as articles do.</p></body></html>")


def test_data_resiliparse_extractor_or_its_message(monkeypatch):
    assert data.extract_text_from_html_bytes(_PAGE).startswith("Heading\nFirst paragraph")
    with pytest.raises(UsageError, match="builtin or resiliparse"):
        data.extract_text_from_html_bytes(_PAGE, extractor="lxml")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "resiliparse.extract.html2text", None)  # as if not installed
        data.resiliparse_extractor.cache_clear()
        with pytest.raises(UsageError, match="pip install resiliparse"):
            data.extract_text_from_html_bytes(_PAGE, extractor="resiliparse")
        with pytest.raises(UsageError, match="pip install resiliparse"):
            data.pipeline("x", "y", **{**data.PIPELINE_OPTIONS, "extractor": "resiliparse"})
    data.resiliparse_extractor.cache_clear()


def test_data_resiliparse_extractor_when_installed():
    pytest.importorskip("resiliparse")
    data.resiliparse_extractor.cache_clear()
    text = data.extract_text_from_html_bytes(_PAGE, extractor="resiliparse")
    assert "First paragraph of the article" in text and "alert" not in text
    record = data.synthetic_crawl()[0]
    theirs = data.extract_record(record, extractor="resiliparse")
    assert data.extract_record(record).splitlines()[2] in theirs  # the same article text


def _owt_archives(cache, docs: int = 40) -> None:
    rng = random.Random(0)
    for name, n in (("train", docs), ("valid", docs // 4)):
        text = "".join("\n".join(data._article(rng, 4)) + data.EOT + "\n" for _ in range(n))
        (cache / f"owt_{name}.txt.gz").write_bytes(gzip.compress(text.encode()))


def test_data_openwebtext_prepares_train_bins(tmp_path, monkeypatch, capsys):
    (cache := tmp_path / "cache").mkdir()
    _owt_archives(cache)
    fetched = []
    monkeypatch.setattr(data, "download", lambda url, dest: fetched.append(url) or dest)
    tokens = data.openwebtext(str(tmp_path / "owt"), str(cache), vocab_size=300, workers=1,
                              progress=False)
    assert [u.rsplit("/", 1)[1] for u in fetched] == ["owt_train.txt.gz", "owt_valid.txt.gz"]
    out = tmp_path / "owt"
    tok = Tokenizer.from_dir(out / "tokenizer")
    for split, name in (("train", "train"), ("val", "valid")):
        text = gzip.decompress((cache / f"owt_{name}.txt.gz").read_bytes()).decode()
        bins = train.load_tokens(out / f"{split}.bin", tok)  # what --train_bin reads
        assert len(bins) == tokens[split] > 0 and tok.decode(bins.tolist()) == text
    assert "--train_bin=" in capsys.readouterr().out
    data.openwebtext(str(tmp_path / "cut"), str(cache), max_mb=1e-4, tokenizer=str(
        out / "tokenizer"), workers=1, progress=False)  # whole lines, at least 105 bytes
    cut, whole = (tmp_path / "cut" / "train.txt").read_text(), (out / "train.txt").read_text()
    assert 105 <= len(cut.encode()) < 400 and whole.startswith(cut) and cut.endswith("\n")
    assert json.loads((tmp_path / "cut" / "train.bin.json").read_text())["num_tokens"] > 0


def test_data_rerun_reuses_tokenizer_and_bins_only_for_the_same_text(tmp_path, monkeypatch):
    (cache := tmp_path / "cache").mkdir()
    _owt_archives(cache)
    monkeypatch.setattr(data, "download", lambda url, dest: dest)
    out, real = tmp_path / "owt", (train.train_bpe, train.encode_file)

    def run(max_mb: float) -> dict[str, int]:
        return data.openwebtext(str(out), str(cache), max_mb, vocab_size=300, workers=1,
                                progress=False)

    def no_work(*args, **kwargs):
        raise AssertionError("the same text was tokenized again")

    first = run(0)
    monkeypatch.setattr(train, "train_bpe", no_work)
    monkeypatch.setattr(train, "encode_file", no_work)
    assert run(0) == first  # the same text: nothing redone
    monkeypatch.setattr(train, "train_bpe", real[0])
    monkeypatch.setattr(train, "encode_file", real[1])
    cut = run(1e-4)  # other text: tokenizer and .bin files made again, never the stale ones
    tok = Tokenizer.from_dir(out / "tokenizer")
    for split in ("train", "val"):
        tokens = train.load_tokens(out / f"{split}.bin", tok)
        assert len(tokens) == cut[split] and tok.decode(tokens.tolist()) == (
            out / f"{split}.txt").read_text()
    assert cut["train"] < first["train"]


def test_data_openwebtext_says_when_offline(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(data, "download", offline)
    with pytest.raises(UsageError, match="offline \\(no route to host\\).*owt_train.txt.gz"):
        data.main(["openwebtext", f"--cache_dir={tmp_path}", f"--out={tmp_path / 'o'}"])


# =================================================================================================
# align.py
# =================================================================================================

import copy  # noqa: E402
from dataclasses import replace  # noqa: E402
from itertools import combinations  # noqa: E402

import align  # noqa: E402


def _byte_tokenizer() -> Tokenizer:
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])


def _align_lm(vocab_size: int = 257, seed: int = 0, context_length: int = 64) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=vocab_size, context_length=context_length,
                                     d_model=32, num_layers=1, num_heads=2, d_ff=64))


class _HFLike(torch.nn.Module):
    """A Hugging Face-like wrapper: the output holds .logits."""
    def __init__(self, lm: TransformerLM):
        super().__init__()
        self.lm, self.config = lm, lm.config

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.lm(input_ids))


def test_align_tokenize_prompt_and_output_masks_and_shift():
    tok = _byte_tokenizer()
    out = align.tokenize_prompt_and_output(["ab", "c"], ["xy", "zzzz"], tok)
    pad = tok.token_id("<|endoftext|>")
    full = [[97, 98, 120, 121, pad], [99, 122, 122, 122, 122]]  # "abxy" padded right, "czzzz"
    assert out["input_ids"].tolist() == [row[:-1] for row in full]
    assert out["labels"].tolist() == [row[1:] for row in full]
    # labels are tokens 1..4: the response starts at label 1 ("x") in row 0, label 0 in row 1
    assert out["response_mask"].tolist() == [[False, True, True, False],
                                             [True, True, True, True]]
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        align.tokenize_prompt_and_output([""], ["x"], tok)


def test_align_rollouts_sample_from_the_ids_training_packs(monkeypatch):
    class BOSTokenizer:  # like a Hugging Face tokenizer: BOS first unless add_special_tokens=False
        eos_token_id = 0

        def encode(self, text, add_special_tokens=True):
            return [1] * add_special_tokens + [ord(c) for c in text]
    seen = []
    monkeypatch.setattr(align, "generate_batch", lambda m, t, prompts, **kw: seen.append(prompts))
    align.rollouts(_align_lm(), BOSTokenizer(), ["ab", "c"], align.AlignConfig(), 2, seed=0)
    packed = align.tokenize_prompt_and_output(["ab", "c"], ["x", "y"], BOSTokenizer())
    assert seen == [[[97, 98], [99]]] and packed["input_ids"][0, :2].tolist() == [97, 98]


def test_align_response_longer_than_context_is_truncated_with_a_warning():
    tok = _byte_tokenizer()
    with pytest.warns(UserWarning, match="1 of 2 .* truncated"):
        out = align.tokenize_prompt_and_output(["ab", "c"], ["xyzw", "z"], tok, max_len=4)
    assert out["input_ids"].shape == (2, 4)  # 5 tokens kept: input_ids and labels are 4 long
    assert out["response_mask"][0].tolist() == [False, True, True, True]


def test_align_masked_mean_and_normalize_with_an_all_masked_row():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("-inf"), 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    assert align.masked_mean(x, mask, dim=-1).tolist() == [1.5, 5.0, 0.0]  # no NaN, no -inf
    assert align.masked_mean(x, mask).item() == pytest.approx(13 / 4)
    assert align.masked_normalize(x, mask, -1, 2.0).tolist() == [1.5, 5.0, 0.0]
    assert align.masked_normalize(x, mask, 0).tolist() == [5.0, 2.0, 6.0]
    assert align.masked_normalize(x, mask, normalize_constant=4.0).item() == 13 / 4


def test_align_entropy_and_log_probs_against_direct_formulas():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11) * 5
    p = logits.softmax(-1)
    assert torch.allclose(align.compute_entropy(logits), -(p * p.log()).sum(-1), atol=1e-5)
    extreme = torch.tensor([[0.0, -1e4, -1e4]])  # p underflows to 0: still finite, ~0
    assert align.compute_entropy(extreme).abs().item() < 1e-6
    lm = _align_lm()
    ids = torch.randint(0, 257, (2, 6))
    labels = torch.randint(0, 257, (2, 6))
    out = align.get_response_log_probs(lm, ids, labels, return_token_entropy=True)
    expected = F.log_softmax(lm(ids), -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(out["log_probs"], expected, atol=1e-5)
    assert torch.allclose(out["token_entropy"], align.compute_entropy(lm(ids)), atol=1e-5)
    hf = align.get_response_log_probs(_HFLike(lm), ids, labels)["log_probs"]
    assert torch.allclose(hf, expected, atol=1e-5)


def test_align_group_normalized_rewards_known_values_and_equal_rewards():
    def reward(text, truth):
        return {"reward": float(text == truth), "format_reward": 1.0}
    adv, raw, meta = align.compute_group_normalized_rewards(
        reward, ["a", "b", "a", "a", "x", "y"], ["a"] * 3 + ["z"] * 3, 3, 1e-6, True)
    assert raw.tolist() == [1, 0, 1, 0, 0, 0]
    std = torch.tensor([1.0, 0, 1]).std().item()  # unbiased, as torch.std
    assert torch.allclose(adv[:3], torch.tensor([1 / 3, -2 / 3, 1 / 3]) / (std + 1e-6))
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # all equal: zero advantage, no NaN
    assert meta["groups_all_equal"] == 0.5 and meta["reward_mean"] == pytest.approx(1 / 3)
    adv, _, _ = align.compute_group_normalized_rewards(reward, ["a", "b"], ["a", "a"], 2, 1e-6,
                                                       False)
    assert adv.tolist() == [0.5, -0.5]
    adv, _, _ = align.compute_group_normalized_rewards(reward, ["a"], ["a"], 1, 1e-6, True)
    assert adv.tolist() == [0.0]
    for responses, size in (([], 2), (["a", "b", "c"], 2), (["a"], 0)):
        with pytest.raises(ValueError, match="whole number of non-empty groups"):
            align.compute_group_normalized_rewards(reward, responses, ["a"] * len(responses),
                                                   size, 1e-6, True)


def test_align_policy_gradient_losses_known_values():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    adv = torch.tensor([[2.0], [-1.0]])
    naive = align.compute_naive_policy_gradient_loss(adv, logp)
    assert torch.allclose(naive, -adv * logp)
    old = torch.log(torch.tensor([[0.25, 0.25], [0.25, 0.5]]))  # ratios 2, 1 / 2, 1
    loss, meta = align.compute_grpo_clip_loss(adv, logp, old, 0.2)
    # A > 0, ratio 2: min(2A, 1.2A) = 1.2A; A < 0, ratio 2: min(-2, -1.2) = -2 (no clip)
    assert torch.allclose(loss, torch.tensor([[-2.4, -2.0], [2.0, 1.0]]))
    assert meta["clipped"].tolist() == [[True, False], [False, False]]
    for kind, kw in (("no_baseline", {"raw_rewards": adv}),
                     ("reinforce_with_baseline", {"advantages": adv}),
                     ("grpo_clip", {"advantages": adv, "old_log_probs": old, "cliprange": 0.2})):
        got, _ = align.compute_policy_gradient_loss(logp, kind, **kw)
        assert torch.allclose(got, naive if kind != "grpo_clip" else loss)
    with pytest.raises(ValueError, match="needs old_log_probs"):
        align.compute_policy_gradient_loss(logp, "grpo_clip", advantages=adv, cliprange=0.2)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        align.compute_policy_gradient_loss(logp, "ppo", advantages=adv)


def test_align_grpo_microbatch_step_normalisations_and_kl():
    logp0 = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.5, 0.5, 0.5]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([[1.0], [-1.0]])
    for constant, expected in ((None, [[-0.5 / 2 / 2, -0.5 / 2 / 2, 0], [0.5 / 2, 0, 0]]),
                               (4.0, [[-1 / 4 / 2 / 2, -1 / 4 / 2 / 2, 0], [1 / 4 / 2 / 2, 0, 0]])):
        logp = logp0.clone().requires_grad_()
        loss, _ = align.grpo_microbatch_train_step(logp, mask, 2, "reinforce_with_baseline",
                                                   advantages=adv, normalize_constant=constant)
        assert torch.allclose(logp.grad, torch.tensor(expected))
    logp = logp0.clone().requires_grad_()
    _, meta = align.grpo_microbatch_train_step(logp, mask, 1, "grpo_clip", advantages=adv,
                                               old_log_probs=logp0, cliprange=0.2,
                                               ref_log_probs=logp0, kl_coef=0.5)
    assert meta["kl"].item() == 0.0 and not meta["clipped"].any()
    _, meta = align.grpo_microbatch_train_step(logp0.clone().requires_grad_(), mask, 1,
                                               "reinforce_with_baseline", advantages=adv,
                                               ref_log_probs=logp0 - 1.0, kl_coef=0.5)
    assert meta["kl"].item() == pytest.approx(math.exp(-1) + 1 - 1)


def test_align_sft_microbatch_step_sums_and_accumulates():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.9]])).requires_grad_()
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, meta = align.sft_microbatch_train_step(logp, mask, 2, normalize_constant=3.0)
    nll = torch.tensor([math.log(8), math.log(2)]) / 3
    assert meta["nll"].tolist() == pytest.approx(nll.tolist(), rel=1e-6)
    assert loss.item() == pytest.approx(nll.mean().item() / 2, rel=1e-6)
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 12, -1 / 12], [-1 / 12, 0.0]]))


def test_align_dpo_with_policy_equal_to_reference_is_log_2():
    tok, lm = _byte_tokenizer(), _align_lm()
    loss = align.compute_per_instance_dpo_loss(lm, copy.deepcopy(lm), tok, 0.1, "2+2=", "4",
                                               "five")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()  # the gradient flows into lm, not into the frozen reference
    assert lm.lm_head.weight.grad is not None
    other = _align_lm(seed=1)
    beta = 0.5
    got = align.compute_per_instance_dpo_loss(lm, other, tok, beta, "2+2=", "4", "five")
    data = align.tokenize_prompt_and_output(["2+2=", "2+2="], ["4", "five"], tok)
    pi, ref = (align.sequence_log_probs(m, data).detach() for m in (lm, other))
    expected = -F.logsigmoid(beta * ((pi[0] - ref[0]) - (pi[1] - ref[1])))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="reference model's vocabulary has 300 tokens"):
        align.compute_per_instance_dpo_loss(lm, _align_lm(300), tok, 0.1, "a", "b", "c")


def test_align_reward_model_scores_the_last_response_token():
    tok, lm = _byte_tokenizer(), _align_lm()
    rm = align.make_reward_model(lm)
    assert rm.lm_head.weight.shape == (1, 32) and lm.lm_head.weight.shape == (257, 32)
    data = align.tokenize_prompt_and_output(["ab", "a"], ["c", "bcd"], tok)
    scores = align.reward_scores(rm, data)
    alone = [rm(torch.tensor([list(text)]))[0, -1, 0] for text in (b"abc", b"abcd")]
    assert torch.allclose(scores, torch.stack(alone), atol=1e-5)  # padding never read
    loss = align.bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((-math.log(torch.sigmoid(torch.tensor(2.0)).item())
                                         + math.log(2)) / 2)


def test_align_sft_drives_the_loss_on_a_tiny_set_towards_zero():
    tok, lm = _byte_tokenizer(), _align_lm()
    examples = [("1+1=", "2"), ("2+2=", "4"), ("3+3=", "6"), ("4+4=", "8")]
    cfg = align.AlignConfig(batch_size=4, sft_lr=1e-2)
    rows = align.sft(lm, tok, examples, 60, cfg)
    assert rows[0]["loss"] > 3.0 and rows[-1]["loss"] < 0.05
    assert rows[-1]["entropy"] < rows[0]["entropy"]


def test_align_short_grpo_run_raises_the_mean_reward():
    tok, lm = _byte_tokenizer(), _align_lm()

    def reward(text: str, truth: str) -> dict:  # the share of ASCII characters: ~1/2 at first
        return {"reward": sum(c.isascii() for c in text) / max(1, len(text))}
    cfg = align.AlignConfig(grpo_steps=8, group_size=8, rollout_batch_size=32,
                            train_batch_size=16, batch_size=16, max_new_tokens=4,
                            grpo_lr=3e-2, eval_interval=100, seed=0)
    rows = align.grpo_train(lm, tok, ["ab", "cd", "ef", "gh"], [""] * 4, reward, cfg)
    first, last = rows[0]["reward"], sum(r["reward"] for r in rows[-2:]) / 2
    assert last > first + 0.1, (first, last)
    assert all(0 <= r["clip_fraction"] <= 1 and r["length"] <= 4 for r in rows)


def test_align_numbers_and_the_r1_zero_reward():
    for text in ("1,000", "1000", "1000.0", "$1,000", " 1000. "):
        assert align.normalize_number(text) == "1000"
    assert align.normalize_number("0.50") == "0.5" and align.normalize_number("-0") == "0"
    assert align.normalize_number("12 apples") is None and align.normalize_number("") is None
    assert align.answers_match("1,000", "1000.0") and not align.answers_match("100", "1000")
    assert align.answers_match(" Paris", "paris")
    good = " 3 + 4 = 7. </think> <answer> 7 </answer>"
    assert align.r1_zero_reward_fn(good, "7") == {"format_reward": 1.0, "answer_reward": 1.0,
                                                   "reward": 1.0}
    assert align.r1_zero_reward_fn(good, "8")["format_reward"] == 1.0
    assert align.r1_zero_reward_fn(good, "8")["reward"] == 0.0
    assert align.r1_zero_reward_fn(" 7 <answer> 7 </answer>", "7")["reward"] == 0.0  # no </think>
    assert align.r1_zero_reward_fn(" </think> <answer> 7", "7")["reward"] == 0.0  # not closed
    assert align.question_only_reward_fn("so she has 7 apples", "7")["reward"] == 1.0


def test_align_parse_gsm8k_and_mmlu_responses():
    assert align.parse_gsm8k_response("She pays $1,250 in total.") == "1250"
    assert align.parse_gsm8k_response("10 - 4 = 6, so 6.0") == "6"
    assert align.parse_gsm8k_response("-3 degrees then 2.50") == "2.5"
    assert align.parse_gsm8k_response("no numbers here") is None
    example = {"options": ["red", "blue", "green", "yellow"]}
    cases = {"The correct answer is B": "B", "Answer: (C)": "C", "answer is D.": "D",
             "D": "D", "(B) blue": "B", "C. green": "C", "I pick yellow": "D",
             "A good answer would be hard": None, "The answer is E": None, "": None,
             "red or blue": None, "The answer is B, not A": "B"}
    for output, letter in cases.items():
        assert align.parse_mmlu_response(example, output) == letter, output


def test_align_pass_at_k_against_enumeration():
    for n, c in ((5, 0), (5, 2), (4, 4), (6, 1)):
        for k in range(1, n + 1):
            draws = list(combinations([1] * c + [0] * (n - c), k))
            assert align.pass_at_k(n, c, k) == pytest.approx(sum(map(any, draws)) / len(draws))


def test_align_loaders_read_good_files_and_name_the_bad_line(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text('{"question": "q1", "answer": "3 + 4 = 7\\n#### 1,000"}\n\n'
                   '{"question": "q2", "answer": "12"}\n')
    assert align.load_gsm8k(gsm) == [{"question": "q1", "answer": "1000"},
                                     {"question": "q2", "answer": "12"}]
    bad = {'{"question": "q"}\n': r":1: expected a JSON object with string fields question\+answer",
           '{"question": "q", "answer": "x"}\n{oops\n': ":2: not valid JSON",
           '["q", "a"]\n': "expected a JSON object", '\n\n': "no examples",
           '{"question": "q", "answer": "it is #### seven"}\n': "'#### <number>'"}
    for text, message in bad.items():
        gsm.write_text(text)
        with pytest.raises(ValueError, match=message):
            align.load_gsm8k(gsm)
    gsm.write_bytes(b'{"question": "\xff"}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        align.load_gsm8k(gsm)
    with pytest.raises(FileNotFoundError, match="no such file"):
        align.load_gsm8k(tmp_path / "missing.jsonl")
    mmlu = tmp_path / "m.csv"
    mmlu.write_text('question,A,B,C,D,answer\n"What, really?",a,b,c,d,C\n')
    assert align.load_mmlu(mmlu) == [{"question": "What, really?", "options": ["a", "b", "c", "d"],
                                      "answer": "C"}]
    for text, message in (("q,a,b,c,d\n", ":1: expected 6 columns"), ("q,a,b,c,d,E\n",
                                                                       ":1: .* A, B, C or D")):
        mmlu.write_text(text)
        with pytest.raises(ValueError, match=message):
            align.load_mmlu(mmlu)
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text('{"prompt": "p", "response": "r"}\n'
                      '{"instruction": "i", "input": "x", "output": "o"}\n'
                      '{"instruction": "j", "input": "", "output": "o2"}\n')
    assert align.load_alpaca(alpaca) == [("p", "r"), ("i\n\nx", "o"), ("j", "o2")]
    alpaca.write_text('{"prompt": "p", "output": "r"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:1: expected a JSON object with string fields"):
        align.load_alpaca(alpaca)


def test_align_packed_sft_dataset_and_batches(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n"
                            for i in range(3)))
    tok = _byte_tokenizer()
    data = align.get_packed_sft_dataset(tok, path, 16, shuffle=False)
    eot = tok.token_id("<|endoftext|>")
    text = "".join(align.ALPACA_TEMPLATE.format(prompt=f"p{i}", response=f"r{i}") + "\0"
                   for i in range(3))
    ids = [eot if c == "\0" else ord(c) for c in text]
    assert len(data) == (len(ids) - 1) // 16 and len(data[-1]["labels"]) == 16
    assert data[1]["input_ids"].tolist() == ids[16:32] and data[1]["labels"].tolist() == ids[17:33]
    batches = list(align.iterate_batches(data, 4, shuffle=True, seed=1))
    assert [len(b["input_ids"]) for b in batches] == [4] * (len(data) // 4) + (
        [len(data) % 4] if len(data) % 4 else [])
    seen = sorted(tuple(row.tolist()) for b in batches for row in b["input_ids"])
    assert seen == sorted(tuple(data[i]["input_ids"].tolist()) for i in range(len(data)))
    with pytest.raises(ValueError, match="fewer than one sequence"):
        align.get_packed_sft_dataset(tok, path, 10_000, shuffle=False)


def test_align_task_is_seeded_disjoint_and_right():
    cfg = align.AlignConfig(train_problems=300, heldout_problems=50, pretrain_stories=100)
    train_set, heldout, stories = align.make_task(cfg)
    assert [p.question for p in align.make_task(cfg)[0]] == [p.question for p in train_set]
    assert not {p.question for p in train_set} & {p.question for p in heldout}
    for p in train_set + heldout:
        steps = [s.strip() for s in p.reasoning.split(".") if s.strip()]
        value = None
        for s in steps:  # "7 + 3 = 10": each step right, each starting where the last ended
            a, op, b, _, c = s.split()
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c) >= 0
            assert value is None or int(a) == value
            value = int(c)
        assert str(value) == p.answer and 1 <= len(steps) <= cfg.max_steps
        assert align.r1_zero_reward_fn(align.response(p), p.answer)["reward"] == 1.0
    with pytest.raises(UsageError, match="too few distinct questions"):
        align.make_task(align.AlignConfig(max_steps=1, max_number=1, train_problems=300))


def test_align_command_line_errors():
    with pytest.raises(UsageError, match="--size must be one of"):
        align.main(["--size=huge"])
    with pytest.raises(UsageError, match="--loss_type must be one of"):
        align.main(["--loss_type=ppo"])
    with pytest.raises(UsageError, match="unknown option --grpo_step"):
        align.main(["--grpo_step=3"])
    with pytest.raises(UsageError, match="eval needs --model"):
        align.main(["eval", "--data=x.jsonl"])


SMOKE = dict(max_steps=1, max_number=5, train_problems=64, heldout_problems=16,
             pretrain_stories=400, model=dict(d_model=32, num_layers=1, num_heads=2, d_ff=64),
             vocab_size=300, pretrain_iters=4, pretrain_batch=4, shots=0, max_new_tokens=12,
             eval_samples=2, batch_size=16, sft_examples=16, sft_steps=2, ei_steps=1,
             ei_questions=4, grpo_steps=2, group_size=4, rollout_batch_size=16, train_batch_size=8,
             dpo_questions=16, dpo_steps=2, rm_steps=2, eval_interval=1)


def test_align_demo_smoke_run(tmp_path, capsys):
    cfg = align.make_config({"size": "cpu"}, {**SMOKE, "out": str(tmp_path)})
    summary = align.demo(cfg)
    assert set(summary) >= {"base", "sft", "ei", "grpo", "dpo"}
    assert all(0 <= summary[k] <= 1 for k in ("base", "sft", "ei", "grpo", "dpo"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["results"]) == {"base", "base_q", "sft", "ei", "grpo", "dpo"}
    assert len(saved["curves"]["grpo"]) == cfg.grpo_steps
    assert "held-out accuracy" in capsys.readouterr().out
    model, tok = infer.load_checkpoint_model(str(tmp_path / "grpo.pt"))  # its tokenizer found
    assert model.config.d_model == 32 and tok.vocab_size == model.config.vocab_size
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "Tom has 2 pens.", "answer": "#### 2"}) + "\n")
    for ckpt in ("grpo.pt", "base/ckpt.pt"):  # ours and train.py's, no --tokenizer_dir
        result = align.main(["eval", f"--model={tmp_path / ckpt}", f"--data={data}",
                             "--max_new_tokens=4", "--device=cpu"])
        assert 0 <= result["accuracy"] <= 1


def test_align_grpo_ablations_and_kl_run_and_stay_finite():
    tok, lm = _byte_tokenizer(), _align_lm()
    ref = copy.deepcopy(lm)
    for flags in ({"loss_type": "no_baseline"},
                  {"loss_type": "reinforce_with_baseline", "normalize_by_std": False},
                  {"clip": False, "length_normalization": "constant", "kl_coef": 0.1,
                   "epochs_per_rollout_batch": 2}):
        cfg = align.AlignConfig(grpo_steps=1, group_size=4, rollout_batch_size=8,
                                train_batch_size=4, batch_size=4, max_new_tokens=3, **flags)
        rows = align.grpo_train(lm, tok, ["ab", "cd"], ["", ""], lambda text, truth: {
            "reward": sum(c.isascii() for c in text) / max(1, len(text))}, cfg, ref)
        assert all(math.isfinite(rows[0][k]) for k in ("entropy", "clip_fraction", "kl"))
    assert rows[0]["kl"] > 0  # the earlier runs moved the policy away from the reference
    with pytest.raises(ValueError, match="reference model's vocabulary"):
        align.grpo_train(lm, tok, ["ab", "cd"], ["", ""], lambda t, a: {"reward": 0.0}, cfg,
                         _align_lm(300))
    for bad, prompts in (({"group_size": 3}, ["ab"] * 4), ({}, ["ab"])):
        with pytest.raises(UsageError, match=r"group_size questions \(got"):
            align.grpo_train(lm, tok, prompts, [""] * len(prompts),
                             lambda t, a: {"reward": 0.0}, replace(cfg, **bad))
