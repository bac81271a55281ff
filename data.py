"""Stage 8: data, from crawled web pages to clean training tokens for train.py.

CS336 lectures 13-14 and assignment 4, in teaching order: WARC/WET records; text from HTML;
language id; PII masking; the Gopher rules; fastText-style classifiers; Kneser-Ney perplexity
and DSIR importance filters; dedup (exact lines, MinHash + LSH, a Bloom filter); contamination;
the parallel, sharded pipeline into train.py's .bin files; does filtering help (`compare`).

Commands (CPU; settings are --key=value; an error is one line, --debug shows the traceback):
    python data.py                                   # the demo; `demo --out=DIR` keeps its files
    python data.py pipeline --input='crawl/*.warc.gz' --out=DIR --workers=4   [--languages=en,de
        --quality=M.npz --nsfw=M.npz --toxic=M.npz --eval=FILE --tokenizer=DIR --line_dedup=bloom
        --shard=i/n (0-based; then `pipeline --out=DIR --merge`)]   (see PIPELINE_OPTIONS)
    python data.py compare    # the tiny model on unfiltered vs filtered text: held-out perplexity
    python data.py bench      # docs/s: extraction, language id, MinHash; vs resiliparse, datasketch
    python data.py openwebtext --max_mb=500   # the course's OpenWebText -> data_cache/owt/*.bin
    python train.py --train_bin=DIR/train.bin --val_bin=DIR/val.bin --tokenizer_dir=DIR/tokenizer
A classifier: FastTextClassifier.train(open("lines.txt")).save("M.npz"), lines `__label__X text`;
    or fastText's own .bin (lid.176.bin: --lid_model=); --extractor=resiliparse when installed.
Reads   WARC/WET files, gzipped (a member per record, as Common Crawl) or plain; a folder, a glob.
Writes  DIR/train.bin, val.bin (+ .json), tokenizer/, train.txt, val.txt, report.json, shards/,
        each whole or not at all; a re-run on the same text keeps tokenizer/ and the .bin files.
Papers  Rae et al. 2021 (Gopher); Joulin et al. 2017 (fastText); Chen & Goodman 1998 (Kneser-
        Ney); Wenzek et al. 2020 (CCNet); Xie et al. 2023 (DSIR); Broder 1997 (MinHash); Leskovec
        et al., Mining of Massive Datasets ch. 3 (LSH); Bloom 1970; Brown et al. 2020 (13-gram
        contamination); Lee et al. 2022 (dedup); Penedo et al. 2024 (FineWeb); Li et al. 2024.
"""

import codecs
import contextlib
import functools
import glob
import gzip
import hashlib
import html.parser
import json
import math
import mmap
import multiprocessing
import os
import random
import shutil
import struct
import sys
import tempfile
import timeit
import unicodedata
import urllib.error
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import regex
from tqdm import tqdm

from tokenizer import (PRETOKEN_RE, Tokenizer, UsageError, atomic_output, encode_file,
                       parse_command, run_cli, write_atomic)
from train import (EOT, TrainConfig, build_model_config, download, perplexity, tokenize_splits,
                   tokenizer_with_eot)
from train import train as train_model


# 1. Crawl files: WARC records, streamed -----------------------------------------------------------
@dataclass
class WarcRecord:
    """One WARC record; `body` is the HTTP reply's body in a `response`, else the whole payload."""
    headers: dict[str, str]  # WARC header lines as written, e.g. {"WARC-Type": "response", ...}
    payload: bytes  # the content block, Content-Length bytes
    http_headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    type = property(lambda self: self.headers.get("WARC-Type", ""))  # not fields: no annotation
    url = property(lambda self: self.headers.get("WARC-Target-URI", ""))


def _split_http(payload: bytes) -> tuple[dict[str, str], bytes]:
    """An HTTP reply's headers (lower-case names, no status line) and body; lines may end in LF."""
    head, sep, body = payload.partition(b"\r\n\r\n" if b"\r\n\r\n" in payload else b"\n\n")
    if not sep or not head.startswith(b"HTTP/"):
        return {}, payload
    pairs = (line.split(":", 1) for line in head.decode("latin-1").splitlines()[1:] if ":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}, body


def iter_warc_records(path: str | os.PathLike,
                      errors: Counter | None = None) -> Iterator[WarcRecord]:
    """A WARC/WET file's records, streamed. Never raises: a wrong Content-Length or stray bytes
    skip to the next `WARC/` line, a cut file ends the file; each is logged, counted in `errors`."""
    def bad(reason: str, detail: str) -> None:
        (Counter() if errors is None else errors)[reason] += 1
        print(f"warning: {path}: {detail}", file=sys.stderr)
    try:  # gzip reads concatenated members in turn: Common Crawl gzips each record alone
        with open(path, "rb") as raw, (gzip.open(raw) if raw.peek(2)[:2] == b"\x1f\x8b"
                                       else raw) as f:
            in_sync = True  # False while skipping to the next record
            while line := f.readline():
                if not line.startswith(b"WARC/"):
                    if line.strip() and in_sync:
                        bad("not a WARC record", f"skipped bytes that are no record: {line[:30]!r}")
                    in_sync = in_sync and not line.strip()
                    continue
                in_sync, headers = True, {}
                while (line := f.readline()).strip():
                    name, _, value = line.decode("utf-8", "replace").partition(":")
                    headers[name.strip()] = value.strip()
                length = headers.get("Content-Length", "")
                payload = f.read(int(length)) if length.isdigit() else b""
                if length.isdigit() and len(payload) < int(length):
                    raise EOFError("record shorter than its Content-Length")
                if not length.isdigit() or f.peek(2)[:2] not in (b"", b"\r\n", b"\n"):
                    in_sync = False  # a record ends in a blank line: else its length is wrong
                    bad("wrong Content-Length", f"record {headers.get('WARC-Target-URI', '')} has "
                        f"Content-Length {length!r}, not its length: skipped")
                    continue
                http = headers.get("WARC-Type") == "response"  # else body is the whole payload
                yield WarcRecord(headers, payload, *_split_http(payload) if http else ({}, payload))
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        bad("file cut short or unreadable", f"ends early ({e}); records before it were read")


def make_response_record(url: str, html_bytes: bytes, content_type: str = "text/html",
                         record_id: int = 0) -> WarcRecord:
    """A `response` record the way a crawler stores one: HTTP headers, a blank line, the page."""
    payload = (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(html_bytes)}\r\n\r\n").encode("latin-1") + html_bytes
    headers = {"WARC-Type": "response", "WARC-Target-URI": url, "WARC-Date": "2024-01-01T00:00:00Z",
               "WARC-Record-ID": f"<urn:uuid:00000000-0000-4000-8000-{record_id:012d}>",
               "Content-Type": "application/http; msgtype=response",
               "Content-Length": str(len(payload))}
    return WarcRecord(headers, payload, *_split_http(payload))


def write_warc(path: str | os.PathLike, records: Iterable[WarcRecord]) -> None:
    """Write records as WARC/1.0, streaming, atomically; each its own gzip member for a .gz."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        for record in records:
            headers = {**record.headers, "Content-Length": str(len(record.payload))}
            block = "WARC/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            data = (block + "\r\n").encode("utf-8") + record.payload + b"\r\n\r\n"
            f.write(gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)


# 2. Text from HTML: decode, drop boilerplate, keep the block structure ----------------------------
SKIP_TAGS = {"script", "style", "noscript", "nav", "header", "footer", "aside", "template",
             "svg", "title", "iframe", "button", "select"}  # not <form>: ASP.NET wraps whole pages
BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr",
              "table", "section", "article", "main", "blockquote", "pre", "dd", "dt", "hr",
              "body", "figcaption", "td", "th"}  # each starts a new line in the text
META_CHARSET = regex.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([\w.:-]+)""", regex.I)
WHITESPACE = regex.compile(r"\s+")
HEADER_CHARSET = regex.compile(r"charset\s*=\s*[\"']?([\w.:-]+)", regex.I)


def decode_html_bytes(html_bytes: bytes, declared: str | None = None, strict: bool = False) -> str:
    """UTF-8 if valid (most of the web), else the charset the HTTP header or a <meta> declares,
    else Windows-1252; never fails unless strict=True and every declared charset is unknown."""
    with contextlib.suppress(UnicodeDecodeError):
        return html_bytes.decode("utf-8")
    meta = META_CHARSET.search(html_bytes[:4096])
    names = [n for n in (declared, meta and meta.group(1).decode("ascii", "replace")) if n]
    for name in names:
        with contextlib.suppress(LookupError):  # an unknown name: try the next guess
            return html_bytes.decode(codecs.lookup(name).name, errors="replace")
    if strict and names:
        raise ValueError(f"unknown charset {names[0]!r}")
    return html_bytes.decode("cp1252", errors="replace")


class _TextParser(html.parser.HTMLParser):
    """Collect text outside SKIP_TAGS; a block tag ends the current line."""
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # &amp; -> & and &#233; -> é for us
        self.parts, self.skip_depth = [], 0  # skip_depth > 0 inside <script>, <nav>, ...

    def handle_starttag(self, tag: str, attrs, step: int = 1) -> None:
        self.skip_depth = max(0, self.skip_depth + step * (tag in SKIP_TAGS))  # a stray </nav>
        self.parts += ["\n"] if tag in BLOCK_TAGS else []

    def handle_endtag(self, tag: str) -> None:
        self.handle_starttag(tag, [], -1)

    def handle_data(self, data: str) -> None:
        if not self.skip_depth:  # a newline in the source is a space; only blocks break lines
            self.parts.append(WHITESPACE.sub(" ", data))


def extract_text_from_html_bytes(html_bytes: bytes, charset: str | None = None,
                                 strict: bool = False, extractor: str = "builtin") -> str | None:
    """The visible text of a page, a line per paragraph, heading or list item (None if empty);
    `charset` is the HTTP header's. extractor="resiliparse": the course's, main content only."""
    text = decode_html_bytes(html_bytes, charset, strict)
    if extractor == "resiliparse":
        text = resiliparse_extractor()(text, main_content=True)
    elif extractor == "builtin":
        (parser := _TextParser()).feed(text)
        parser.close()
        text = "".join(parser.parts)
    else:
        raise UsageError(f"extractor must be builtin or resiliparse, got {extractor!r}")
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line) or None


@functools.cache
def resiliparse_extractor():
    try:
        from resiliparse.extract.html2text import extract_plain_text
    except ImportError:
        raise UsageError("extractor=resiliparse needs: pip install resiliparse") from None
    return extract_plain_text


def extract_record(record: WarcRecord, strict: bool = False,
                   extractor: str = "builtin") -> str | None:
    """Text of a crawl record: HTML responses through the extractor, WET conversions as they are."""
    if record.type == "conversion":
        return record.body.decode("utf-8", errors="replace").strip() or None
    content_type = record.http_headers.get("content-type", "")
    if record.type != "response" or (content_type and "html" not in content_type):
        return None  # warcinfo, request and metadata records, images, PDFs
    return extract_text_from_html_bytes(
        record.body, (HEADER_CHARSET.search(content_type) or [None, None])[1], strict, extractor)


# 3. Language identification: the script, then character n-grams -----------------------------------
# Most scripts name their language: kana is Japanese, hangul Korean, Han alone Chinese, Cyrillic
# (here) Russian, Arabic script Arabic. Latin-script languages need statistics: naive Bayes over
# hashed character n-grams, trained on their most frequent words below, or on a user's labels.
SCRIPT_RUNS = regex.compile(r"(\p{Latin}+)|(\p{Han}+)|([\p{Hiragana}\p{Katakana}]+)|(\p{Hangul}+)|"
                            r"(\p{Cyrillic}+)|(\p{Arabic}+)|(\p{L}+)")  # the last: other letters
LID_CHARS = 2000  # the first characters decide: a page rarely changes language after them
FREQUENT_WORDS = {
    "en": "the of and to in is that it for was on with as are be this by at from have not or an "
          "they which you his her he she we but all has their been were will would there what",
    "de": "der die und das ist nicht ein eine zu den von mit sich des auf für im dem auch es an "
          "als wie bei oder aus nach wird sind noch über nur werden hat war ich sie er wir uns",
    "fr": "le la les de des et est un une du en que qui dans pour pas sur au avec ce il elle ne "
          "se plus par sont nous vous mais ont été cette leur aux ou comme tout être très",
    "es": "el la los las de del y que en un una es por con para no se su al lo como más pero "
          "sus le ya o este sí porque esta entre cuando muy sin sobre también fue hay",
    "pt": "o a os as de do da dos das e que em um uma é para com não por mais se na no ao como "
          "mas foi ele ela são seu sua ou quando muito já também está nos isso pelo você",
    "it": "il lo la i gli le di del della e che è un una per con non si da in sono come ma più "
          "anche nel alla questo questa ha erano essere molto quando dei delle degli sul loro"}


def hashed_ngrams(text: str, buckets: int, minn: int = 1, maxn: int = 3,
                  word_ngrams: int = 1) -> np.ndarray:
    """fastText's features as bucket ids: each word, each run of 2..word_ngrams words, each
    minn..maxn-character n-gram of "<word>". Hashing bounds the table whatever the vocabulary."""
    words = text.lower().split()
    ids = [i for word in words for i in _word_ids(word, buckets, minn, maxn)]
    ids += [zlib.crc32("\x00".join(words[i:i + n]).encode()) % buckets
            for n in range(2, word_ngrams + 1) for i in range(len(words) - n + 1)]
    return np.array(ids, np.int64)


@functools.lru_cache(maxsize=1 << 16)  # words repeat (Zipf): most are hashed once
def _word_ids(word: str, buckets: int, minn: int, maxn: int) -> tuple[int, ...]:
    padded = f"<{word}>"  # and the word itself as "\x00word", never a character n-gram
    grams = [padded[i:i + n] for n in range(minn, maxn + 1) for i in range(len(padded) - n + 1)]
    return tuple(zlib.crc32(g.encode()) % buckets for g in ["\x00" + word, *grams])


def read_labelled(lines: Iterable[str]) -> list[tuple[str, str]]:
    """fastText's format, lines or an open file: `__label__en Some text` -> ("en", "Some text")."""
    pairs = [line.strip().partition(" ")[::2] for line in lines if line.strip()]
    if bad := [label for label, _ in pairs if not label.startswith("__label__") or len(label) < 10]:
        raise ValueError(f"expected `__label__X text` lines, got one starting {bad[0][:30]!r}")
    return [(label[9:], text) for label, text in pairs]


def _softmax(x: np.ndarray) -> np.ndarray:
    return (e := np.exp(x - x.max())) / e.sum()


class NaiveBayesLanguageId:
    """P(lang | text) proportional to prod_f P(f | lang) over the text's hashed n-grams (uniform
    prior), each P(f | lang) a frequency smoothed by alpha; trained on `__label__xx text` lines."""
    def __init__(self, lines: Iterable[str], buckets: int = 1 << 16, alpha: float = 0.1):
        pairs = read_labelled(lines)
        self.buckets, self.labels = buckets, sorted({label for label, _ in pairs})
        counts = np.zeros((len(self.labels), buckets))
        for label, text in pairs:
            np.add.at(counts[self.labels.index(label)], hashed_ngrams(text, buckets), 1)
        self.log_prob = np.log((counts + alpha) / (counts.sum(1, keepdims=True) + alpha * buckets))

    def predict(self, text: str) -> tuple[str, float]:
        ids = hashed_ngrams(text[:LID_CHARS], self.buckets)
        if not len(ids):
            return "unknown", 0.0
        # n-grams are far from independent: log-likelihoods / sqrt(n) keep the score informative
        p = _softmax(self.log_prob[:, ids].sum(1) / math.sqrt(len(ids)))
        return self.labels[int(p.argmax())], float(p.max())


_latin_model = functools.cache(lambda: NaiveBayesLanguageId(  # built at first use
    f"__label__{lang} {words}" for lang, words in FREQUENT_WORDS.items()))


def identify_language(text: str, model=None) -> tuple[str, float]:
    """(ISO 639-1 code, score in [0, 1]): the script decides zh ja ko ru ar, naive Bayes en de fr
    es pt it; other scripts' letters lower the score. A `model` (or path: lid.176.bin) overrides."""
    text = text[:LID_CHARS]
    if model:
        return _as_model(model).predict(text)
    n = [0] * 7  # letters in each group of SCRIPT_RUNS, in one pass
    for run in SCRIPT_RUNS.finditer(text):
        n[run.lastindex - 1] += run.end() - run.start()
    latin, han, kana, hangul, cyrillic, arabic, _ = n
    groups = {"latin": latin, "cjk": han + kana + hangul, "ru": cyrillic, "ar": arabic}
    script = max(groups, key=groups.get)
    if not groups[script]:
        return "unknown", 0.0
    share = groups[script] / sum(n)
    if script == "cjk":  # Japanese mixes kana into Han; Korean may mix in a few Han characters
        script = "ko" if hangul >= max(kana, 1) else "ja" if 20 * kana >= groups["cjk"] else "zh"
    lang, score = _latin_model().predict(text) if script == "latin" else (script, 1.0)
    return lang, score * share


# 4. PII: emails, phone numbers, IP addresses ------------------------------------------------------
# The lookarounds stop a match inside a longer token: a phone number in a 14-digit id, an IP in a
# version number 1.2.3.4.5. The masks hold no digits or @, so masking twice counts nothing new.
EMAIL_RE = regex.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
US_PHONE = r"(?:\+?1[-. ]?)?(?:\(\d{3}\)|\d{3})[-. ]?\d{3}[-. ]?\d{4}"
INTL_PHONE = r"\+[2-9]\d{0,2}(?:[-. ]?\(?\d{1,4}\)?){2,5}"  # +44 20 7946 0958, +33 1 23 45 67 89
PHONE_RE = regex.compile(rf"(?<![\w+(])(?:{US_PHONE}|{INTL_PHONE})(?![\w])")
OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"  # 0-255, no leading zeros
IP_RE = regex.compile(rf"(?<![\w.]){OCTET}(?:\.{OCTET}){{3}}(?!\.?\d)")
# Each mask: text -> (the masked text, how many it masked).
mask_emails = functools.partial(EMAIL_RE.subn, "|||EMAIL_ADDRESS|||")
mask_ips = functools.partial(IP_RE.subn, "|||IP_ADDRESS|||")


def mask_phone_numbers(text: str) -> tuple[str, int]:
    masked = PHONE_RE.sub(lambda m: "|||PHONE_NUMBER|||" if 10 <= sum(map(str.isdigit, m[0])) <= 15
                          else m[0], text)  # 10 to 15 digits: E.164 allows at most 15
    return masked, masked.count("|||PHONE_NUMBER|||") - text.count("|||PHONE_NUMBER|||")


def mask_pii(text: str) -> tuple[str, dict[str, int]]:
    """All three masks in turn, emails first (their digits must not look like phone numbers)."""
    counts = {}
    for name, mask in (("emails", mask_emails), ("phones", mask_phone_numbers), ("ips", mask_ips)):
        text, counts[name] = mask(text)
    return text, counts


# 5. Gopher quality rules --------------------------------------------------------------------------
# Rae et al. 2021, appendix A: cheap rules that drop pages no human would call prose. Words here
# are whitespace-separated tokens (the paper tokenizes; the thresholds hardly notice).
def gopher_rules(text: str) -> dict[str, bool]:
    """Each rule on its own, True where the text passes it."""
    words, lines = text.split(), [line for line in text.splitlines() if line.strip()]
    mean_length = sum(map(len, words)) / len(words) if words else 0.0
    ellipsis = sum(line.rstrip().endswith(("...", "\u2026")) for line in lines)
    alphabetic = sum(any(c.isalpha() for c in word) for word in words)
    return {"50 to 100,000 words": 50 <= len(words) <= 100_000,
            "mean word length 3 to 10": 3 <= mean_length <= 10,
            "at most 30% of lines end in ...": 10 * ellipsis <= 3 * len(lines),  # exact
            "at least 80% of words alphabetic": 5 * alphabetic >= 4 * len(words)}


def gopher_quality_filter(text: str) -> bool:
    return all(gopher_rules(text).values())


# 6. Classifiers: fastText's linear model, for NSFW, toxic speech and quality ----------------------
class FastTextClassifier:
    """fastText's supervised model (Joulin et al. 2017): the mean embedding of a text's hashed word
    and character n-grams, a linear layer, a softmax; SGD by example, the rate falling linearly."""
    FORMAT = "cs336-fasttext-1"

    def __init__(self, labels: Sequence[str], dim: int = 16, buckets: int = 1 << 18,
                 word_ngrams: int = 2, minn: int = 3, maxn: int = 5, seed: int = 0):
        self.labels = list(labels)
        self.config = dict(dim=dim, buckets=buckets, word_ngrams=word_ngrams, minn=minn, maxn=maxn)
        rng = np.random.default_rng(seed)
        self.embeddings = rng.uniform(-1 / dim, 1 / dim, (buckets, dim)).astype(np.float32)
        self.output = np.zeros((len(self.labels), dim), np.float32)  # fastText starts it at 0

    def features(self, text: str) -> np.ndarray:
        return hashed_ngrams(text, **{k: v for k, v in self.config.items() if k != "dim"})

    def predict(self, text: str) -> tuple[str, float]:
        ids = self.features(text)
        hidden = self.embeddings[ids].mean(0) if len(ids) else np.zeros(self.config["dim"])
        p = _softmax(self.output @ hidden)  # (num_labels,)
        return self.labels[int(p.argmax())], float(p.max())

    @classmethod
    def train(cls, lines: Iterable[str], epochs: int = 5, lr: float = 0.5,
              seed: int = 0, **config) -> "FastTextClassifier":
        """From `__label__X text` lines (or an open file); config: dim, buckets, word_ngrams..."""
        pairs = read_labelled(lines)
        if len(labels := sorted({label for label, _ in pairs})) < 2:
            raise ValueError("a classifier needs training lines of at least two labels")
        model = cls(labels, seed=seed, **config)
        data = [(labels.index(label), model.features(text)) for label, text in pairs]
        rng, steps = np.random.default_rng(seed), epochs * len(data)
        order = np.concatenate([rng.permutation(len(data)) for _ in range(epochs)])  # per epoch
        for t, (label, ids) in enumerate(data[i] for i in order):
            if len(ids):
                rate, hidden = lr * (1 - t / steps), model.embeddings[ids].mean(0)  # (dim,)
                grad = _softmax(model.output @ hidden)  # d loss / d logits = p - onehot(label)
                grad[label] -= 1
                grad_hidden = model.output.T @ grad
                model.output -= rate * np.outer(grad, hidden)
                np.add.at(model.embeddings, ids, -rate / len(ids) * grad_hidden)  # repeats add
        return model

    def save(self, path: str | os.PathLike) -> None:
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, format=self.FORMAT, labels=json.dumps(self.labels),
                     config=json.dumps(self.config), embeddings=self.embeddings, output=self.output)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FastTextClassifier | FastTextBin":
        """What save wrote, or an official fastText .bin file (read by FastTextBin)."""
        try:
            with open(path, "rb") as f:
                if f.read(4) == FASTTEXT_MAGIC.to_bytes(4, "little"):
                    return FastTextBin(path)
            with np.load(path) as z:
                if str(z["format"]) != cls.FORMAT:
                    raise ValueError(f"format {str(z['format'])!r}")
                model = cls(json.loads(str(z["labels"])), **json.loads(str(z["config"])))
                model.embeddings, model.output = z["embeddings"], z["output"]
                return model
        except Exception as e:  # not a zip, no such array, a cut .bin...: all one answer
            raise ValueError(f"{path} is not a classifier saved by data.py or fastText ({e})"
                             ) from None


# Official fastText .bin files: lid.176.bin, the course's NSFW, toxic and quality models. Layout
# (little-endian): magic, version, 12 int32 arguments and a double; the dictionary; the input
# matrix (nwords word rows, then `bucket` n-gram rows); the output matrix, a row per label.
FASTTEXT_MAGIC = 793712314
FASTTEXT_ARGS = ("dim ws epoch min_count neg word_ngrams loss model bucket minn maxn "
                 "lr_update_rate").split()  # loss: 1 hs, 2 ns, 3 softmax, 4 ova; model: 3 sup
FASTTEXT_SPACE = regex.compile(rb"[ \n\r\t\v\f\0]+")  # what fastText's readWord splits on


def fnv1a(data: bytes) -> int:
    """fastText's 32-bit FNV-1a hash, bytes read as C's signed char: a byte >= 128 is XORed as a
    negative number, so non-ASCII text hashes unlike the textbook FNV-1a."""
    h = 2166136261
    for byte in data:
        h = ((h ^ (byte | 0xFFFFFF00 if byte > 127 else byte)) * 16777619) & 0xFFFFFFFF
    return h


class FastTextBin:
    """A supervised model from fastText's .bin, predicting as the fasttext package: the mean input
    row of the words (`</s>` ends a line), the n-grams of "<word>" and the word n-grams; then
    softmax, hierarchical softmax (hs) or a sigmoid per label (ns, ova). .ftz files are refused."""
    def __init__(self, path: str | os.PathLike):
        with open(path, "rb") as f:  # mapped, not read: the course's classifiers are ~1 GB
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

        def read(fmt: str) -> tuple:
            return struct.unpack("<" + fmt, buf.read(struct.calcsize("<" + fmt)))

        def matrix() -> np.ndarray:  # a view of the file: no copy
            start, (rows, cols) = buf.tell() + 16, read("2q")
            buf.seek(start + 4 * rows * cols)
            return np.frombuffer(buf, np.float32, rows * cols, start).reshape(rows, cols)
        magic, version = read("2i")
        if magic != FASTTEXT_MAGIC or not 11 <= version <= 12:
            raise ValueError(f"not a fastText model of a version this reads ({version})")
        self.args = dict(zip(FASTTEXT_ARGS, read("12i")))
        if self.args["model"] != 3:
            raise ValueError("a fastText word-vector model, not a supervised classifier")
        self.args["maxn"] *= version > 11  # version 11's classifiers had no character n-grams
        _, size, self.nwords, _, _, pruned = read("d3i2q")  # pruned: -1 unless quantized
        # each entry: its bytes, a 0 byte, an int64 count, an int8 type (0 word, 1 label)
        entries = [(buf.read(buf.find(b"\0", buf.tell()) - buf.tell()), *read("xqb"))
                   for _ in range(size)]
        if pruned >= 0 or read("?")[0]:
            raise ValueError("a quantized fastText model (.ftz): read the .bin it came from")
        self.input, _, self.output = matrix(), read("?"), matrix()
        if self.input.shape[0] != self.nwords + self.args["bucket"]:
            raise ValueError(f"{self.input.shape[0]} input rows for {self.nwords} words and "
                             f"{self.args['bucket']} buckets")
        self.word_ids = {word: i for i, (word, _, _) in enumerate(entries[:self.nwords])}
        self.labels = [w.decode("utf-8", "replace").removeprefix("__label__")
                       for w, _, _ in entries[self.nwords:]]
        if self.args["loss"] == 1:  # hs: Huffman's tree on the label counts (sorted, falling)
            n, self.tree = len(self.labels), []  # tree[k]: node n + k's (left, right) children
            count, leaf, node = [c for _, c, _ in entries[self.nwords:]] + [math.inf] * n, n - 1, n
            for i in range(n, 2 * n - 1):  # join the two smallest leaves or nodes left
                pair = []
                for _ in range(2):  # leaves from the end, nodes from n; a tie takes the node
                    pair.append(leaf if leaf >= 0 and count[leaf] < count[node] else node)
                    leaf, node = (leaf - 1, node) if pair[-1] == leaf else (leaf, node + 1)
                count[i] = count[pair[0]] + count[pair[1]]
                self.tree.append(tuple(pair))
        self._subwords = functools.lru_cache(1 << 16)(self._subwords)

    def _subwords(self, word: bytes) -> list[int]:
        """Rows of the minn..maxn-character n-grams of "<word>", characters being UTF-8's."""
        word, minn, maxn = b"<" + word + b">", self.args["minn"], self.args["maxn"]
        starts = [i for i, byte in enumerate(word) if byte & 0xC0 != 0x80] + [len(word)]
        return [self.nwords + fnv1a(word[starts[a]:starts[a + n]]) % self.args["bucket"]
                for a in range(len(starts) - 1) for n in range(max(minn, 1), maxn + 1)
                if a + n < len(starts) and not (n == 1 and (a == 0 or a + 2 == len(starts)))]

    def features(self, text: str) -> list[int]:
        ids, hashes = [], []
        for token in [*FASTTEXT_SPACE.split(text.encode()), b"</s>"]:  # a line ends in EOS
            if not token or token.startswith(b"__label__"):
                continue
            ids += [self.word_ids[token]] if token in self.word_ids else []
            ids += self._subwords(token) if token != b"</s>" else []
            hashes.append((fnv1a(token) ^ 1 << 31) - (1 << 31))  # as C++'s int32
        for i, h in enumerate(hashes):  # word n-grams: a 64-bit rolling hash of int32 hashes
            for j in range(i + 1, min(i + self.args["word_ngrams"], len(hashes))):
                h = (h * 116049371 + hashes[j]) % 2**64
                ids.append(self.nwords + h % self.args["bucket"])
        return ids

    def predict(self, text: str) -> tuple[str, float]:
        ids = self.features(text.replace("\n", " "))  # fastText reads one line
        hidden = self.input[ids].mean(0) if ids else np.zeros(self.input.shape[1], np.float32)
        logits, n = self.output @ hidden, len(self.labels)  # (n,), or (n - 1,) nodes for hs
        if self.args["loss"] == 3:
            p = _softmax(logits)
        elif self.args["loss"] == 1:  # P(leaf): the branch probabilities above it (right: sigmoid)
            f, p = 1 / (1 + np.exp(-logits)), np.ones(2 * n - 1)
            for node in range(2 * n - 2, n - 1, -1):  # the root first
                left, right = self.tree[node - n]
                p[left], p[right] = p[node] * (1 - f[node - n]), p[node] * f[node - n]
        else:  # ns, ova: a sigmoid per label, which fastText looks up in 512 steps over [-8, 8]
            steps = np.floor((np.clip(logits, -8, 8) + 8) * 32)
            p = np.where(abs(logits) > 8, logits > 0, 1 / (1 + np.exp(8 - steps / 32)))
        return self.labels[int(p[:n].argmax())], float(p[:n].max())


_load_classifier = functools.cache(FastTextClassifier.load)  # once per process, not per page


def _as_model(model):  # a model, or the path of one
    return _load_classifier(str(model)) if isinstance(model, (str, os.PathLike)) else model


def _classify(text: str, model, labels: tuple[str, str]) -> tuple[str, float]:
    if sorted((model := _as_model(model)).labels) != sorted(labels):
        raise ValueError(f"the classifier's labels are {model.labels}, expected {list(labels)}")
    return model.predict(text.replace("\n", " "))


# The course's three classifiers: f(text, model or its path) -> (label, score). Quality means like
# the pages Wikipedia cites ("wiki") or like random crawl ("cc"); toxic e.g. trained on Jigsaw's.
classify_nsfw = functools.partial(_classify, labels=("nsfw", "non-nsfw"))
classify_toxic_speech = functools.partial(_classify, labels=("toxic", "non-toxic"))
classify_quality = functools.partial(_classify, labels=("wiki", "cc"))


# 7. Perplexity and importance filters: a Kneser-Ney n-gram LM, DSIR -------------------------------
PUNCTUATION = regex.compile(r"[\p{P}\p{S}]+")


def normalize_text(text: str) -> str:
    """Lowercase, NFD, accents and punctuation dropped, whitespace collapsed: "Café, déjà-vu!" is
    "cafe deja vu", so the n-gram models and dedup shingles ignore trivial edits."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(PUNCTUATION.sub(" ", text).split())


class KneserNeyLM:
    """Interpolated Kneser-Ney (Chen & Goodman 1998) on normalised words, a sentence per line:
        P(w | h) = max(c(h w) - D, 0) / c(h.) + D N(h.) / c(h.) P(w | h without its first word)
    with N(h.) the number of distinct w after h. Below the top order c counts distinct left
    neighbours ("Francisco", frequent but only after "San", is no likely novel continuation),
    down to uniform over the vocabulary (<unk> included). CCNet keeps the pages a Wikipedia LM
    finds least perplexing."""
    def __init__(self, texts: Iterable[str], order: int = 3, discount: float = 0.75):
        self.order, self.discount = order, discount
        self.counts = [Counter() for _ in range(order + 1)]  # [k]: k-gram -> (continuation) count
        self.counts[order].update(gram for text in texts for tokens in self._sentences(text)
                                  for gram in zip(*(tokens[i:] for i in range(order))))
        for k in range(order - 1, 0, -1):
            self.counts[k].update(gram[1:] for gram in self.counts[k + 1])
        self.vocab = sorted({gram[0] for gram in self.counts[1]} | {"<unk>"})
        self.types = [Counter(gram[:-1] for gram in c) for c in self.counts]  # context -> N(h.)
        self.totals = [Counter() for _ in self.counts]  # [k]: context -> c(h.)
        for totals, counts in zip(self.totals, self.counts):
            for gram, c in counts.items():
                totals[gram[:-1]] += c

    def _sentences(self, text: str) -> Iterator[list[str]]:
        for line in text.splitlines():
            if words := normalize_text(line).split():
                yield ["<s>"] * (self.order - 1) + words + ["</s>"]

    def prob(self, word: str, context: Sequence[str] = ()) -> float:
        """P(word | the last order-1 words of context), padded with <s> at the start."""
        context = tuple((["<s>"] * self.order + list(context))[len(context) + 1:])
        p, d = 1 / len(self.vocab), self.discount  # an unknown word (<unk>) counts 0 at every k
        for k in range(1, self.order + 1):
            h = context[len(context) - k + 1:]
            if total := self.totals[k].get(h):  # an unseen context keeps the lower order's P
                p = (max(self.counts[k].get(h + (word,), 0) - d, 0) + d * self.types[k][h] * p
                     ) / total
        return p

    def perplexity(self, text: str) -> float:
        logs = [math.log(self.prob(tokens[i], tokens[i - self.order + 1:i]))
                for tokens in self._sentences(text) for i in range(self.order - 1, len(tokens))]
        return math.exp(-sum(logs) / len(logs)) if logs else math.inf


def dsir_log_weights(raw_texts: Sequence[str], target_texts: Sequence[str],
                     buckets: int = 10_000) -> np.ndarray:
    """log p_target(x) - log p_raw(x) per raw document, each p a bag of hashed word uni- and
    bigrams fitted (add-one) to its corpus: how much likelier under the target (Xie et al. 2023)."""
    raw, target = ([hashed_ngrams(normalize_text(t), buckets, minn=1, maxn=0, word_ngrams=2)
                    for t in texts] for texts in (raw_texts, target_texts))
    counts = [np.bincount(np.concatenate([np.zeros(0, np.int64), *features]), minlength=buckets)
              + 1.0 for features in (target, raw)]  # add-one
    log_ratio = np.log(counts[0] / counts[0].sum()) - np.log(counts[1] / counts[1].sum())
    return np.array([log_ratio[f].sum() for f in raw])


def dsir_resample(raw_texts: Sequence[str], target_texts: Sequence[str], k: int,
                  buckets: int = 10_000, seed: int = 0) -> list[int]:
    """k raw documents drawn without replacement, P proportional to weight (Gumbel top-k)."""
    log_w = dsir_log_weights(raw_texts, target_texts, buckets)
    keys = log_w + np.random.default_rng(seed).gumbel(size=len(log_w))
    return sorted(np.argsort(-keys)[:k].tolist())


# 8. Deduplication: exact lines, then MinHash and LSH ----------------------------------------------
def _inputs_and_out_dir(input_files: Sequence[str | os.PathLike],
                        output_directory: str | os.PathLike) -> tuple[list[Path], Path]:
    paths, out_dir = [Path(p) for p in input_files], Path(output_directory)
    if clash := [name for name, n in Counter(p.name for p in paths).items() if n > 1]:
        raise UsageError(f"two input files are both named {clash[0]!r}: outputs keep the names")
    out_dir.mkdir(parents=True, exist_ok=True)
    return paths, out_dir


def line_key(line: bytes) -> bytes:
    """What exact line dedup counts: 8 bytes a line, however long; the line ending is no part."""
    return hashlib.blake2b(line.rstrip(b"\r\n"), digest_size=8).digest()


def exact_line_deduplication(input_files: Sequence[str | os.PathLike],
                             output_directory: str | os.PathLike) -> int:
    """Keep only the lines that occur once across all files (a line repeated anywhere, like a
    cookie notice, goes everywhere): pass 1 counts line hashes, pass 2 writes. Lines removed."""
    paths, out_dir, counts = *_inputs_and_out_dir(input_files, output_directory), Counter()
    for path in paths:
        with open(path, "rb") as f:
            counts.update(map(line_key, f))
    for path in paths:
        with open(path, "rb") as f, atomic_output(out_dir / path.name) as tmp, \
                open(tmp, "wb") as out:
            out.writelines(line for line in f if counts[line_key(line)] == 1)
    return sum(n for n in counts.values() if n > 1)


def shingles(text: str, ngrams: int) -> set[str]:
    """The set of word n-grams of the normalised text (one shingle if it is shorter)."""
    words = normalize_text(text).split()
    starts = range(max(1, len(words) - ngrams + 1)) if words else ()
    return {" ".join(words[i:i + ngrams]) for i in starts}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _clusters(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components by union-find: near-duplicates of near-duplicates join one cluster."""
    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees shallow
            i = parent[i]
        return i
    parent = list(range(n))
    for i, j in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


def near_duplicate_clusters_reference(texts: Sequence[str], ngrams: int,
                                      jaccard_threshold: float) -> list[list[int]]:
    """The definition, brute force: every pair's true Jaccard, O(n^2) pairs. The test oracle."""
    sets = [shingles(t, ngrams) for t in texts]
    pairs = [(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))
             if jaccard(sets[i], sets[j]) >= jaccard_threshold]
    return _clusters(len(texts), pairs)


def hash_functions(num_hashes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (a, b) of multiply-shift hashes h(x) = ((a x + b) mod 2^64) >> 32 (Dietzfelbinger
    1996): universal for 32-bit x; numpy's uint64 wraps by itself, so there is no division."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 63, num_hashes, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    return a, rng.integers(0, 1 << 63, num_hashes, dtype=np.uint64)


def minhash_signature_reference(shingle_set: set[str], a: np.ndarray, b: np.ndarray) -> list[int]:
    """For each hash function, the smallest hash over the shingles: two sets agree on it with
    probability equal to their Jaccard similarity (the minimum is equally likely any element)."""
    xs = [zlib.crc32(s.encode()) for s in shingle_set]  # fast C; a and b do the mixing
    return [min((((int(ai) * x + int(bi)) % 2**64) >> 32 for x in xs), default=2**64 - 1)
            for ai, bi in zip(a, b)]


def minhash_signature(shingle_set: set[str], a: np.ndarray, b: np.ndarray,
                      chunk: int = 4096) -> np.ndarray:
    """The same signature, all hash functions at once on a (num_hashes, chunk) array."""
    xs = np.fromiter((zlib.crc32(s.encode()) for s in shingle_set), np.uint64, len(shingle_set))
    signature = np.full(len(a), np.iinfo(np.uint64).max, np.uint64)
    for start in range(0, len(xs), chunk):  # bounded memory on very long documents
        x = xs[start:start + chunk]
        signature = np.minimum(signature, ((a[:, None] * x + b[:, None]) >> np.uint64(32)).min(1))
    return signature


# Why LSH works: two documents of Jaccard similarity s agree on a MinHash row with probability s,
# on a band of r rows with s^r, and share at least one of b bands (become candidates) with
# probability 1 - (1 - s^r)^b, an S-curve. s:       0.3    0.5    0.7    0.8    0.9
#     b=20, r=5 (the default: few misses at 0.8)  0.047  0.470  0.975  1.000  1.000
#     b=10, r=10 (fewer candidates, more misses)  0.000  0.010  0.249  0.679  0.986
# Candidates are verified by their true Jaccard, so the curve trades work for recall only.
def lsh_clusters(signatures: np.ndarray, texts: Sequence[str], num_bands: int, ngrams: int,
                 jaccard_threshold: float) -> list[list[int]]:
    """Clusters without all pairs: documents whose signatures share a band are candidates."""
    if num_bands < 1 or (hashes := signatures.shape[1]) % num_bands:
        raise UsageError(f"num_hashes={hashes} must split into num_bands={num_bands} equal bands")
    buckets: dict[tuple[int, bytes], list[int]] = {}
    for doc, signature in enumerate(signatures):  # empty documents share one signature: merged
        for band, rows in enumerate(np.split(signature, num_bands)):
            buckets.setdefault((band, rows.tobytes()), []).append(doc)
    candidates = {(docs[i], docs[j]) for docs in buckets.values() if len(docs) > 1
                  for i in range(len(docs)) for j in range(i + 1, len(docs))}
    sets = {i: shingles(texts[i], ngrams) for pair in candidates for i in pair}
    return _clusters(len(texts), [(i, j) for i, j in sorted(candidates)
                                  if jaccard(sets[i], sets[j]) >= jaccard_threshold])


def minhash_clusters(texts: Sequence[str], num_hashes: int, num_bands: int, ngrams: int,
                     jaccard_threshold: float, seed: int = 0) -> list[list[int]]:
    a, b = hash_functions(num_hashes, seed)
    signatures = np.array([minhash_signature(shingles(t, ngrams), a, b) for t in texts])
    return lsh_clusters(signatures.reshape(len(texts), num_hashes), texts, num_bands, ngrams,
                        jaccard_threshold)


def minhash_deduplication(input_files: Sequence[str | os.PathLike], num_hashes: int,
                          num_bands: int, ngrams: int, jaccard_threshold: float,
                          output_directory: str | os.PathLike, seed: int = 0) -> list[Path]:
    """Copy one document of each cluster (random, seeded) to output_directory; the kept paths."""
    paths, out_dir = _inputs_and_out_dir(input_files, output_directory)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    clusters = minhash_clusters(texts, num_hashes, num_bands, ngrams, jaccard_threshold, seed)
    kept = [paths[i] for i in sorted(random.Random(seed).choice(c) for c in clusters)]
    for path in kept:
        write_atomic(out_dir / path.name, path.read_bytes())
    return kept


class BloomFilter:
    """A set in m bits answering "seen before?" with no false negatives and false positives at
    rate p: an item sets k bits; after n items an unseen one finds all k set with probability
    (1 - e^(-k n / m))^k, least for m = -n ln p / (ln 2)^2 bits and k = (m / n) ln 2: 9.6 bits
    and 7 hashes an item at p = 1% however long the item (exact dedup holds 8 bytes a line)."""
    def __init__(self, expected_items: int, false_positive_rate: float):
        n, p = expected_items, false_positive_rate
        if n < 1 or not 0 < p < 1:
            raise ValueError(f"need expected_items >= 1 and 0 < false_positive_rate < 1: {n}, {p}")
        self.num_bits = math.ceil(-n * math.log(p) / math.log(2) ** 2)
        self.num_hashes = max(1, round(self.num_bits / n * math.log(2)))
        self.bits = bytearray((self.num_bits + 7) // 8)

    def _positions(self, item: str) -> list[int]:
        # Kirsch & Mitzenmacher 2006: h1 + i h2 for i < k is as good as k independent hashes
        digest = hashlib.blake2b(item.encode(), digest_size=16).digest()
        h1, h2 = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little") | 1
        return [(h1 + i * h2) % self.num_bits for i in range(self.num_hashes)]

    def __contains__(self, item: str) -> bool:
        return all(self.bits[p >> 3] >> (p & 7) & 1 for p in self._positions(item))

    def add(self, item: str) -> bool:
        """Insert item; True if it was (probably) there already."""
        seen = item in self
        for p in self._positions(item):
            self.bits[p >> 3] |= 1 << (p & 7)
        return seen


def bloom_line_deduplication(texts: Iterable[str], bloom: BloomFilter) -> Iterator[str]:
    """Streaming paragraph dedup: each line's first occurrence stays, later ones go (unlike the
    two-pass exact dedup, which drops every copy); memory is the filter's, whatever the corpus."""
    for text in texts:
        yield "\n".join(line for line in text.splitlines() if not bloom.add(line))


# 9. Contamination: training text that contains the test -------------------------------------------
def contamination(train_texts: Sequence[str], eval_texts: Sequence[str],
                  ngrams: int = 13) -> dict[int, set[int]]:
    """{training document: the evaluation examples it shares a normalised word n-gram with}.
    GPT-3 (Brown et al. 2020) used 13-grams, long enough that sharing one is rarely chance."""
    index: dict[str, set[int]] = {}
    for j, text in enumerate(eval_texts):
        for shingle in shingles(text, ngrams):
            index.setdefault(shingle, set()).add(j)
    hits = [set().union(*(index[s] for s in shingles(t, ngrams) if s in index))
            for t in train_texts]
    return {i: found for i, found in enumerate(hits) if found}


# 10. The pipeline: crawl files in, train.py's token files out -------------------------------------
# Stage 1, a crawl file per worker task: extract, language, Gopher rules, classifiers, PII, MinHash.
# Stage 2, once over all shards: near-duplicates, repeated lines, contamination, split, tokenizer.
STEPS = ("bad input", "no text", "language", "gopher rules", "nsfw", "toxic", "quality",
         "near-duplicates", "repeated lines", "contamination")  # the report's rows: documents
# and tokens removed (GPT-2 pre-tokens: no tokenizer exists yet), with an example of each
CLASSIFIERS = {"nsfw": (classify_nsfw, "nsfw"), "toxic": (classify_toxic_speech, "toxic"),
               "quality": (classify_quality, "cc")}  # step -> (classifier, the label dropped)


def _short(text: str, width: int) -> str:
    text = text.replace("\n", " / ")
    return text if len(text) <= width else text[:width - 3] + "..."


def _merge(total: dict, part: dict) -> dict:
    """Add a report's documents and Counters (by step or reason) and keep the first examples."""
    for key, value in part.items():
        total[key] = ({**value, **total.get(key, {})} if key == "examples" else
                      total.get(key, []) + value if key == "docs" else
                      total.get(key, Counter()) + Counter(value))
    return total


def _drop(report: dict, step: str, text: str, note: str = "") -> None:
    _merge(report, {"removed": {step: 1}, "examples": {step: note + _short(text, 70)},
                    "tokens": {step: len(PRETOKEN_RE.findall(text))}})


def filter_file(path: str, opts: dict) -> dict:
    """Stage 1 on one crawl file: pages that pass, masked, with MinHash signatures; a report."""
    report = _merge({}, dict.fromkeys(("removed", "tokens", "errors", "pii", "examples"), {}))
    report["docs"], (a, b) = [], hash_functions(opts["num_hashes"], opts["seed"])
    for record in iter_warc_records(path, report["errors"]):
        try:
            text = extract_record(record, True, opts["extractor"])
        except Exception as e:  # an unknown charset (ValueError), or a page that breaks a parser
            report["errors"]["unknown charset" if isinstance(e, ValueError) else "bad page"] += 1
            print(f"warning: {path}: {record.url}: {e!r}: skipped", file=sys.stderr)
            continue
        if text is None:
            if record.type in ("response", "conversion"):
                _drop(report, "no text", "", f"{record.url} (empty)")
            continue
        lang, score = identify_language(text, opts["lid_model"])
        if opts["languages"] and (lang not in opts["languages"]
                                  or score < opts["min_language_score"]):
            _drop(report, "language", text, f"{lang} {score:.2f}: ")
            continue
        if failed := [rule for rule, ok in gopher_rules(text).items() if not ok]:
            _drop(report, "gopher rules", text, f"{failed[0]}: ")
            continue
        verdicts = [(step, *classify(text, opts[step])) for step, (classify, _)
                    in CLASSIFIERS.items() if opts[step]]
        if bad := [v for v in verdicts if v[1] == CLASSIFIERS[v[0]][1]]:  # the label it drops
            _drop(report, bad[0][0], text, f"{bad[0][1]} {bad[0][2]:.2f}: ")
            continue
        text, found = mask_pii(text)
        report["pii"].update(found)
        signature = minhash_signature(shingles(text, opts["ngrams"]), a, b)
        report["docs"].append((record.url, text, signature.tolist()))
    return report


def finish(out: Path, opts: dict, num_shards: int, workers: int, progress: bool = True) -> dict:
    """Stage 2 over every shard's output: dedup, contamination, split, tokenizer, .bin files."""
    report = {}
    for shard in range(num_shards):
        if not (path := out / "shards" / f"{shard:05d}-of-{num_shards:05d}.json.gz").exists():
            raise UsageError(f"{path} is missing: run `pipeline --shard={shard}/{num_shards}`")
        _merge(report, json.loads(gzip.decompress(path.read_bytes())))
    urls, texts, signatures = zip(*report.pop("docs")) if report["docs"] else ((), (), ())
    signatures = np.array(signatures, np.uint64).reshape(len(texts), opts["num_hashes"])
    clusters = lsh_clusters(signatures, texts, *(opts[k] for k in (
        "num_bands", "ngrams", "jaccard_threshold")))
    keep, texts = sorted(random.Random(opts["seed"]).choice(c) for c in clusters), list(texts)
    for i in sorted(set(range(len(texts))) - set(keep)):  # one of each cluster stays
        _drop(report, "near-duplicates", texts[i], f"{urls[i]}: ")
        texts[i] = ""  # a text emptied here or below leaves the corpus
    # Bloom streams, keeping first copies; exact drops every copy (none: `counts` stays empty)
    lines, mode = [t.splitlines() for t in texts], opts["line_dedup"]
    counts = Counter(line_key(ln.encode()) for doc in lines for ln in doc if mode == "exact")
    goes = (BloomFilter(max(1, sum(map(len, lines))), 1e-6).add if mode == "bloom"
            else lambda ln: counts[line_key(ln.encode())] > 1)
    for i, doc in enumerate(lines):
        if any(drop := [goes(ln) for ln in doc]):  # the one mask splits what stays and goes
            texts[i] = "\n".join(ln for ln, gone in zip(doc, drop) if not gone)
            _drop(report, "repeated lines", "\n".join(ln for ln, gone in zip(doc, drop) if gone))
            report["removed"]["repeated lines"] -= bool(texts[i])  # a document goes when emptied
    if opts["eval"]:
        examples = [t for t in Path(opts["eval"]).read_text(encoding="utf-8").splitlines() if t]
        for i in contamination(texts, examples, opts["eval_ngrams"]):
            _drop(report, "contamination", texts[i], f"{urls[i]}: ")
            texts[i] = ""
    urls, texts = [u for u, t in zip(urls, texts) if t], [t for t in texts if t]
    if len(texts) < 2:
        raise ValueError(f"only {len(texts)} document(s) left after filtering: nothing to split")
    # The split hashes the URL, so a page keeps its split as the crawl grows.
    val = [hashlib.blake2b(u.encode()).digest()[0] < opts["val_fraction"] * 256 for u in urls]
    if all(val) or not any(val):  # a small crawl still gets both splits
        val = [i == len(texts) - 1 for i in range(len(texts))]
    for name, flag in (("train", False), ("val", True)):
        write_atomic(out / f"{name}.txt", "".join(t + EOT for t, v in zip(texts, val) if v == flag))
    tok_dir, bin_tokens = tokenize_out_dir(out, opts["tokenizer"], opts["vocab_size"], workers,
                                           progress)
    report.update(kept=len(texts), kept_tokens=sum(len(PRETOKEN_RE.findall(t)) for t in texts),
                  val_docs=sum(val), tokenizer=tok_dir, bin_tokens=bin_tokens)
    report["removed"]["bad input"], report["examples"]["bad input"] = sum(
        report["errors"].values()), ", ".join(f"{k} {n}" for k, n in report["errors"].items())
    write_atomic(out / "report.json", json.dumps(report, indent=1))
    return report


def tokenize_out_dir(out: Path, tokenizer: str, vocab_size: int, workers: int,
                     progress: bool = True) -> tuple[str, dict[str, int]]:
    """out/{train,val}.txt -> train.py's out/{train,val}.bin, with the tokenizer folder `tokenizer`
    or one trained into out/tokenizer. A previous run's files are kept (train.py's
    tokenize_splits) only if out/tokenized.json says they were made from these texts."""
    tok_dir = Path(tokenizer or out / "tokenizer")
    if tokenizer:
        tokenizer_with_eot(str(tok_dir))  # fails before any encoding
    stamp, made_from = out / "tokenized.json", {"vocab_size": None if tokenizer else vocab_size}
    for name in ("train.txt", "val.txt"):
        with open(out / name, "rb") as f:
            made_from[name] = hashlib.file_digest(f, "blake2b").hexdigest()
    if not stamp.exists() or json.loads(stamp.read_text()) != made_from:  # other text: redo all
        for split in ("train", "val"):
            (out / f"{split}.bin").unlink(missing_ok=True)
        if not tokenizer:
            shutil.rmtree(tok_dir, ignore_errors=True)
        write_atomic(stamp, json.dumps(made_from))
    bins = tokenize_splits(out / "train.txt", out / "val.txt", tok_dir, vocab_size, out, workers,
                           progress)
    return str(tok_dir), {split: json.loads(Path(f"{path}.json").read_text())["num_tokens"]
                          for split, path in zip(("train", "val"), bins)}


def pipeline(input: str, out: str, workers: int = 1, shard: str = "0/1", merge: bool = False,
             progress: bool = True, **opts) -> dict | None:
    """The pipeline on `input` (a folder, globs or files, comma-separated); --shard=i/n: stage 1 on
    every n-th file (a Slurm array runs i = 0..n-1), then --merge: stage 2 over all shards."""
    index, num_shards = map(int, shard.split("/") if regex.fullmatch(r"\d+/\d+", shard) else (0, 0))
    if not index < num_shards:
        raise UsageError(f"--shard expects i/n with 0 <= i < n, got {shard!r}")
    out_dir, opts["languages"] = Path(out), [lang for lang in opts["languages"] if lang]
    if opts["line_dedup"] not in ("exact", "bloom", "none"):
        raise UsageError(f"--line_dedup must be exact, bloom or none, got {opts['line_dedup']!r}")
    extract_text_from_html_bytes(b"", extractor=opts["extractor"])  # a bad name, or missing
    models = {**{key: classify for key, (classify, _) in CLASSIFIERS.items()},
              "lid_model": identify_language}
    for key in (*models, "tokenizer", "eval"):  # fail now, not mid-corpus
        if opts[key] and not Path(opts[key]).exists():
            raise UsageError(f"--{key}={opts[key]} does not exist")
        if opts[key] and key in models:  # a call on "" loads the model, checks its labels
            models[key]("", opts[key])
    if merge:
        if not (found := sorted(out_dir.glob("shards/*-of-*.json.gz"))):
            raise UsageError(f"no shard outputs in {out_dir / 'shards'}: run --shard=i/n first")
        num_shards = int(found[0].name.split("-of-")[1][:5])
    else:
        files = sorted(p for p in Path(input).iterdir() if p.is_file()) if Path(input).is_dir() \
            else [Path(p) for part in input.split(",") for p in sorted(glob.glob(part)) or [part]]
        if missing := [p for p in files if not p.is_file()]:
            raise UsageError(f"input file {missing[0]} does not exist")
        if not files:
            raise UsageError(f"no input files in {input}")
        files, report = [str(p) for p in files[index::num_shards]], {}
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with (ctx.Pool(min(workers, len(files))) if workers > 1 and len(files) > 1 else
              contextlib.nullcontext()) as pool:  # fork: no re-import; workers run no threads
            results = (pool.imap if pool else map)(functools.partial(filter_file, opts=opts), files)
            for part in tqdm(results, total=len(files), desc="filter", disable=not progress):
                _merge(report, part)  # imap: in the files' order
        (out_dir / "shards").mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "shards" / f"{index:05d}-of-{num_shards:05d}.json.gz",
                     gzip.compress(json.dumps(report).encode(), mtime=0))
        if num_shards > 1:
            return print(f"shard {index}/{num_shards}: {len(report['docs'])} documents kept from "
                         f"{len(files)} files; after every shard: pipeline --out={out} --merge")
    report = finish(out_dir, opts, num_shards, workers, progress)
    print(f"{'step':<16}{'docs removed':>13}{'tokens removed':>16}   example\n{'-' * 100}")
    for step in (s for s in STEPS if report["removed"][s] or report["tokens"][s]):
        print(f"{step:<16}{report['removed'][step]:>13,}{report['tokens'][step]:>16,}   "
              f"{_short(report['examples'][step], 52)}")
    print(f"{'kept':<16}{report['kept']:>13,}{report['kept_tokens']:>16,}\nPII masked: "
          f"{dict(report['pii'])}\n{out_dir}/train.bin: {report['bin_tokens']['train']:,} tokens,"
          f" val.bin: {report['bin_tokens']['val']:,} ({report['val_docs']} documents)")
    return report


# 11. OpenWebText: the course's web text, downloaded and tokenized for train.py --------------------
def openwebtext(out: str = "data_cache/owt", cache_dir: str = "data_cache", max_mb: float = 0,
                tokenizer: str = "", vocab_size: int = 32000, workers: int = 1,
                progress: bool = True) -> dict[str, int]:
    """The course's OpenWebText sample downloaded into cache_dir (resuming) and prepared into
    out/train.bin, val.bin and tokenizer/; max_mb caps each split's text (0: all, ~12 GB)."""
    (out_dir := Path(out)).mkdir(parents=True, exist_ok=True)
    for split, file in (("train", "owt_train.txt.gz"), ("val", "owt_valid.txt.gz")):
        try:
            url = f"https://huggingface.co/datasets/stanford-cs336/owt-sample/resolve/main/{file}"
            archive = download(url, Path(cache_dir) / file)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:  # not a disk error
            raise UsageError(f"offline ({getattr(e, 'reason', e)}): cannot download {url}; put "
                             f"{file} in {cache_dir}/ and run again") from None
        with gzip.open(archive, "rb") as fin, atomic_output(out_dir / f"{split}.txt") as tmp, \
                open(tmp, "wb") as fout:
            cap = int(max_mb * 2**20) or math.inf  # max_mb=0: all of it
            while fout.tell() < cap and (chunk := fin.read(min(cap, 1 << 22))):
                fout.write(chunk + fin.readline())  # whole lines
    tok_dir, bin_tokens = tokenize_out_dir(out_dir, tokenizer, vocab_size, workers, progress)
    print(f"{out_dir}/train.bin: {bin_tokens['train']:,} tokens, val.bin: {bin_tokens['val']:,}; "
          f"python train.py --train_bin={out_dir}/train.bin --val_bin={out_dir}/val.bin "
          f"--tokenizer_dir={tok_dir}")
    return bin_tokens


# 12. A synthetic crawl, and the demo --------------------------------------------------------------
WORDS = ("river valley farmers harvest grain autumn village market bread mill water wheel stone "
         "bridge travelers merchants wool cloth winter stories children school teacher lesson "
         "garden apples orchard season weather rain clouds mountain forest path evening lamp "
         "library books history council meeting festival music dance square church tower clock "
         "railway station engine carriage journey letters newspaper printer ink paper").split()
GLUE = "the of and in with to from for was is by at on near".split()  # English's frequent words
SPAM = ("buy cheap best price discount offer free shipping click here now deal sale limited "
        "bonus casino win money fast online pills order today guaranteed").split()
FOREIGN = {  # other languages, for the language filter
    "de": "Im Herbst bringen die Bauern das Getreide zur Mühle, und der Markt verkauft Brot. ",
    "fr": "Les voyageurs fatigués s'arrêtent au marché du village pour acheter du pain. ",
    "es": "Los niños caminan por el valle hasta la escuela y el maestro les cuenta historias. ",
    "ru": "Осенью крестьяне везут зерно на мельницу, а на рынке продают свежий хлеб. ",
    "zh": "秋天的时候，农民把粮食送到磨坊，村里的市场上卖新鲜的面包。", "ja": "秋になると、農家の人たちは穀物を水車小屋に運び、村の市場でパンが売られます。"}
BOILERPLATE = ("<header><a href='/'>Home</a> | <a href='/news'>News</a></header>"
               "<nav><ul><li>Login</li><li>Subscribe</li></ul></nav>"
               "<script>var tracker = {id: 42}; if (a < b) { track(); }</script>"
               "<style>body { font-family: serif; }</style>")
FOOTER = "<footer>&copy; 2024 Valley Gazette. All rights reserved.</footer>"


def _article(rng: random.Random, sentences: int = 12) -> list[str]:
    """Paragraphs of plausible sentences: long enough, alphabetic, no ellipses (Gopher passes)."""
    said = [" ".join(f"{rng.choice(GLUE)} {rng.choice(WORDS)}" if rng.random() < 0.5 else
                     rng.choice(WORDS) for _ in range(rng.randint(6, 10))).capitalize() + "."
            for _ in range(sentences)]
    return [" ".join(said[i:i + 4]) for i in range(0, sentences, 4)]


def _page(title: str, paragraphs: list[str], charset: str = "utf-8") -> bytes:
    return (f"<html><head><meta charset='{charset}'><title>{title}</title></head><body>"
            f"{BOILERPLATE}<article><h1>{title}</h1>{''.join(f'<p>{p}</p>' for p in paragraphs)}"
            f"<p>Share this story with your friends.</p></article>{FOOTER}</body></html>"
            ).encode(charset)


def synthetic_crawl(seed: int = 0) -> list[WarcRecord]:
    """Pages a crawler brings back: articles (PII in two), near-duplicates, one in Windows-1252,
    pages in six other languages, pages the Gopher rules drop, fluent spam for a classifier."""
    rng = random.Random(seed)
    texts = [_article(rng) for _ in range(6)]
    texts[1][1] += (" Write to the editor at editor.desk@valley-gazette.org or call "
                    "(283) 182-3829; our server is at 192.168.10.7, not 256.1.1.1.")
    texts[2][0] += " Reach the council at +44 20 7946 0958 or council@town.gov.uk today."
    pages = [_page(f"Article {i}", paras) for i, paras in enumerate(texts)]
    for i in (0, 3):  # a word inserted, or a sentence added
        near = texts[i][:-1] + [texts[i][-1] + " Updated in the evening."] if i % 2 else [
            texts[i][0].replace(" ", " old ", 1), *texts[i][1:]]
        pages.append(_page(f"Article {i} (mirror)", near))
    pages.append(_page("Café résumé", texts[4][:1] + [
        "Notre café propose un menu déjà célèbre dans la vallée, avec des crêpes et du thé pour "
        "les voyageurs fatigués du marché."], charset="cp1252"))
    pages += [_page("Subscribe", ["Click here to subscribe now."]),
              _page("Teasers", [f"{' '.join(rng.sample(WORDS, 9))}..." for _ in range(8)]
                    + ["Read more stories below today"]),
              _page("Prices", [" ".join(f"{rng.randint(1, 999)} | ${rng.randint(1, 99)}.99"
                                        for _ in range(30))]),
              *(_page(lang, [text * 3] * 3) for lang, text in FOREIGN.items()),
              _page("Deals", [" ".join(rng.choices(SPAM, k=20)) + "." for _ in range(4)])]
    return [make_response_record(f"https://valley-gazette.example/{i}", page, record_id=i)
            for i, page in enumerate(pages)]


def demo(out: str = "", workers: int = 2) -> dict:
    """The synthetic crawl through the pipeline, with a quality classifier and an eval set."""
    with tempfile.TemporaryDirectory() as tmp:
        root, rng, records = Path(out or tmp), random.Random(2), synthetic_crawl()
        (root / "crawl").mkdir(parents=True, exist_ok=True)
        write_warc(root / "crawl" / "part0.warc.gz", records[:9])
        write_warc(root / "crawl" / "part1.warc.gz", records[9:])
        lines = [f"__label__wiki {' '.join(_article(rng, 4))}" for _ in range(100)] + [
            f"__label__cc {' '.join(rng.choices(SPAM + WORDS[:5], k=30))}" for _ in range(100)]
        FastTextClassifier.train(lines, buckets=1 << 16).save(quality := root / "quality.npz")
        write_atomic(evals := root / "eval.txt", extract_record(records[5]).splitlines()[2])
        print(f"{len(records)} pages; a quality classifier of 200 made-up lines; eval: page 5")
        return pipeline(str(root / "crawl"), str(root / "out"), workers, progress=False,
                        **{**PIPELINE_OPTIONS, "quality": str(quality), "eval": str(evals)})


def compare(out: str = "", crawls: int = 60, max_iters: int = 200,
            batch_size: int = 16) -> dict[str, float]:
    """Does filtering help? The tiny model trained for the same tokens on the synthetic crawl as
    extracted and as filtered; perplexity on fresh clean articles, one tokenizer for both."""
    with tempfile.TemporaryDirectory() as tmp:
        (root := Path(out or tmp)).mkdir(parents=True, exist_ok=True)
        records = [r for seed in range(1, 1 + crawls) for r in synthetic_crawl(seed)]
        write_warc(root / "crawl.warc.gz", records)
        report = pipeline(str(root / "crawl.warc.gz"), str(root / "filtered"), 2, progress=False,
                          **PIPELINE_OPTIONS)
        rng, tok = random.Random(12345), Tokenizer.from_dir(report["tokenizer"])
        for name, text in (("raw", "".join(t + EOT for r in records if (t := extract_record(r)))),
                           ("heldout", "".join("\n".join(_article(rng)) + EOT for _ in range(50)))):
            write_atomic(root / f"{name}.txt", text)
            encode_file(tok, root / f"{name}.txt", root / f"{name}.bin", progress=False)
        cfgs = {name: TrainConfig(
            train_bin=str(path), val_bin=str(root / "heldout.bin"), max_iters=max_iters,
            tokenizer_dir=report["tokenizer"], batch_size=batch_size, eval_interval=max_iters,
            eval_iters=20, checkpoint_interval=0, num_samples=0, out_dir=str(root / name),
            overwrite=True, device="cpu") for name, path in (
                ("unfiltered", root / "raw.bin"), ("filtered", root / "filtered" / "train.bin"))}
        ppl = {name: perplexity(train_model(cfg)["val_loss"]) for name, cfg in cfgs.items()}
        cfg = cfgs["filtered"]  # the same steps, batches and sequence length as the other
        tokens = (cfg.max_iters * cfg.grad_accum_steps * cfg.batch_size
                  * build_model_config(cfg, tok.vocab_size).context_length)
        print(f"the same {tokens:,} training tokens; perplexity on held-out "
              f"clean text: unfiltered ({len(records)} pages) {ppl['unfiltered']:.2f}, filtered "
              f"({report['kept']} pages) {ppl['filtered']:.2f}")
        return ppl


def bench(crawls: int = 20, repeat: int = 3, num_hashes: int = 128) -> None:
    """Documents/s of extraction, language id, MinHash (beside resiliparse, datasketch) and of
    the pipeline's stage 1 with one worker process and with one per core."""
    pages = [r.body for seed in range(crawls) for r in synthetic_crawl(seed)]
    texts = [t for p in pages if (t := extract_text_from_html_bytes(p))]
    sets, (a, b) = [shingles(t, 5) for t in texts], hash_functions(num_hashes)
    tools: dict[str, tuple | None] = {
        "extraction: data.py (html.parser)": (extract_text_from_html_bytes, pages),
        "language id: data.py (script + naive Bayes)": (identify_language, texts),
        f"MinHash x{num_hashes}: data.py (numpy)": (lambda s: minhash_signature(s, a, b), sets),
        "extraction: resiliparse": None, f"MinHash x{num_hashes}: datasketch": None}
    with contextlib.suppress(UsageError):  # raised at once when resiliparse is missing
        theirs = functools.partial(extract_text_from_html_bytes, extractor="resiliparse")
        similarity = np.mean([jaccard(set((extract_text_from_html_bytes(p) or "").split()),
                                      set((theirs(p) or "").split())) for p in pages])
        tools["extraction: resiliparse"] = (theirs, pages)
        print(f"extracted words, data.py vs resiliparse: mean Jaccard {similarity:.3f}")
    with contextlib.suppress(ImportError):
        from datasketch import MinHash
        first = MinHash(num_hashes)  # its permutations made once, as ours are
        tools[f"MinHash x{num_hashes}: datasketch"] = (lambda s: MinHash(
            num_hashes, permutations=first.permutations, scheme=first.scheme).update_batch(
            [x.encode() for x in s]), sets)
    print(f"{len(pages)} pages, {np.mean([len(t) for t in texts]):.0f} characters of text each")
    for name, tool in sorted(tools.items()):  # deque(map(...), maxlen=0): run, keep nothing
        speed = tool and len(tool[1]) / min(timeit.repeat(
            lambda: deque(map(*tool), maxlen=0), number=1, repeat=repeat))
        print(f"{name:<46}" + (f"{speed:>8,.0f} documents/s" if tool else "not installed"))
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null:
        (crawl := Path(tmp, "crawl")).mkdir()
        docs = 0  # shard 0/2 below: the pipeline's per-file stage alone, on every other file
        for seed in range(6 * crawls):
            write_warc(crawl / f"{seed:04d}.warc.gz", records := synthetic_crawl(seed))
            docs += len(records) * (seed % 2 == 0)
        for workers in sorted({1, os.cpu_count() or 1}):
            with contextlib.redirect_stdout(null):
                seconds = timeit.timeit(lambda: pipeline(str(crawl), f"{tmp}/{workers}", workers,
                                        "0/2", progress=False, **PIPELINE_OPTIONS), number=1)
            print(f"{f'pipeline stage 1, {workers} worker process(es)':<46}"
                  f"{docs / seconds:>8,.0f} documents/s")


# 13. Commands -------------------------------------------------------------------------------------
PIPELINE_OPTIONS = {
    "languages": ["en"], "min_language_score": 0.5,  # --languages= keeps every language
    "lid_model": "",  # a language-id model (lid.176.bin, or ours) replacing the built-in one
    "extractor": "builtin",  # or "resiliparse" (when installed)
    "nsfw": "", "toxic": "", "quality": "",  # FastTextClassifier files; "" = none
    "num_hashes": 100, "num_bands": 20, "ngrams": 5, "jaccard_threshold": 0.8, "seed": 0,
    "line_dedup": "exact",  # "exact" (two passes), "bloom" (streaming, first copy kept), "none"
    "eval": "", "eval_ngrams": 13,  # an evaluation set, an example per line, to decontaminate
    "tokenizer": "", "vocab_size": 2048, "val_fraction": 0.1}  # a tokenizer, or train one
COMMANDS = {
    "demo": {"out": "", "workers": 2},  # out="" keeps nothing: a temporary folder
    "pipeline": {"input": "", "out": "", "workers": 0, "shard": "0/1", "merge": False,
                 **PIPELINE_OPTIONS},  # workers=0: one per core
    "compare": {"out": "", "crawls": 60, "max_iters": 200, "batch_size": 16},
    "bench": {"crawls": 20, "repeat": 3, "num_hashes": 128},
    "openwebtext": {"out": "data_cache/owt", "cache_dir": "data_cache", "max_mb": 0.0,
                    "tokenizer": "", "vocab_size": 32000, "workers": 0}}


def main(argv: list[str]) -> None:
    """`python data.py [COMMAND] [--key=value ...]`; no command runs the demo."""
    if "-h" in argv or "--help" in argv:
        return print(__doc__)
    command, cfg, _, _ = parse_command(argv, COMMANDS, "demo")
    needed = ["out", "input"][:2 - cfg["merge"]] if command == "pipeline" else []
    if missing := [key for key in needed if not cfg[key]]:
        raise UsageError(f"{command} needs --{missing[0]}=...")
    if "workers" in cfg:
        cfg["workers"] = cfg["workers"] or os.cpu_count() or 1
    {"demo": demo, "pipeline": pipeline, "compare": compare, "bench": bench,
     "openwebtext": openwebtext}[command](**cfg)


if __name__ == "__main__":
    run_cli(main)
