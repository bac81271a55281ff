"""Stage 8: data, from crawled web pages to clean training text (first part).

CS336 lectures 13-14 and assignment 4, in teaching order (`python data.py` shows every step on a
synthetic crawl it writes as a real WARC file, offline, in about a second):
  1. crawl files: WARC/WET records streamed one at a time from gzip, no third-party library;
  2. extract_text_from_html_bytes: decode whatever the page's bytes are, drop scripts and
     navigation boilerplate, keep paragraphs, headings and list items as lines;
  3. PII masking: emails, phone numbers and IPv4 addresses replaced by |||EMAIL_ADDRESS||| etc.;
  4. Gopher quality rules (Rae et al. 2021), each rule reported on its own;
  5. deduplication: exact lines (two passes over line hashes), then near-duplicate documents by
     MinHash and locality-sensitive hashing, checked against a brute-force all-pairs reference.

Why LSH works: split num_hashes MinHash values into b bands of r rows. Two documents of Jaccard
similarity s agree on one row with probability s, on a whole band with s^r, and become candidates
(agree on at least one band) with probability 1 - (1 - s^r)^b, an S-curve:
    s                      0.3    0.5    0.7    0.8    0.9
    b=20, r=5  (100)      0.047  0.470  0.975  1.000  1.000    <- the default: few misses at 0.8
    b=10, r=10 (100)      0.000  0.010  0.249  0.679  0.986    <- fewer candidates, more misses
Candidates are then verified by their true Jaccard, so the curve trades work for recall only.

Commands (CPU; settings are --key=value; an error is one line, --debug shows the traceback):
    python data.py                                    # the demo; also `python data.py demo`
    python data.py demo --out=DIR                     # ... keeping its crawl and outputs in DIR
    python data.py extract --input=crawl.warc.gz --out=DIR   [--mask] [--quality]
    python data.py dedup --input=DIR --out=DIR2 --method=exact|minhash   [--num_hashes=100
        --num_bands=20 --ngrams=5 --jaccard_threshold=0.8]   (--input: a folder, glob or a,b,c)
Reads   WARC or WET files, gzipped (one gzip member per record, as Common Crawl) or plain.
Writes  extract: DIR/000000.txt ... one text file per page; dedup: the kept files, same names.
        Every file is written whole or not at all.
Next    (not here yet) language id, fastText-style classifiers (NSFW, toxic, quality), KenLM-style
        perplexity and DSIR filters, a Bloom filter for paragraphs, contamination checks, the
        parallel sharded pipeline that tokenizes for train.py, `compare` (does filtering help?),
        `bench` next to resiliparse and datasketch, and counted skipping of every kind of bad input.

Papers  Rae et al. 2021 (Gopher: quality rules); Broder 1997 (MinHash); Leskovec, Rajaraman &
        Ullman, Mining of Massive Datasets ch. 3 (LSH bands); Lee et al. 2022 (Deduplicating
        training data makes language models better); Penedo et al. 2023-24 (RefinedWeb, FineWeb);
        Li et al. 2024 (DataComp-LM).
"""

import codecs
import glob
import gzip
import hashlib
import html.parser
import io
import os
import random
import sys
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import regex

from tokenizer import UsageError, atomic_output, parse_command, run_cli, write_atomic


# 1. Crawl files: WARC records, streamed -----------------------------------------------------------
@dataclass
class WarcRecord:
    """One WARC record. For `response` records, `http_headers` and `body` split the HTTP reply;
    for every other type `body` is the whole payload (a WET `conversion` record's text)."""
    headers: dict[str, str]  # WARC header lines as written, e.g. {"WARC-Type": "response", ...}
    payload: bytes  # the content block, Content-Length bytes
    http_headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    @property
    def type(self) -> str:
        return self.headers.get("WARC-Type", "")

    @property
    def url(self) -> str:
        return self.headers.get("WARC-Target-URI", "")


def _split_http(payload: bytes) -> tuple[dict[str, str], bytes]:
    """An HTTP reply's header lines (lower-case names; the status line dropped) and its body."""
    head, sep, body = payload.partition(b"\r\n\r\n")
    if not sep:  # some crawlers end header lines with a bare \n
        head, sep, body = payload.partition(b"\n\n")
    if not sep or not head.startswith(b"HTTP/"):
        return {}, payload
    lines = head.decode("latin-1").splitlines()[1:]
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}, body


def _open_maybe_gzip(path: str | os.PathLike) -> io.BufferedIOBase:
    with open(path, "rb") as f:
        magic = f.read(2)
    # gzip.open reads concatenated members in sequence: Common Crawl gzips each record alone
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def iter_warc_records(path: str | os.PathLike) -> Iterator[WarcRecord]:
    """Yield the records of a WARC/WET file one at a time: memory holds one record, never the file.
    A file cut short (a truncated download) ends the iteration with a warning, not a crash."""
    with _open_maybe_gzip(path) as f:
        try:
            while True:
                line = f.readline()
                if not line:
                    return
                if not line.strip():  # the blank lines between records
                    continue
                if not line.startswith(b"WARC/"):
                    raise ValueError(f"{path}: expected a WARC/ version line, got {line[:40]!r}")
                headers = {}
                while (line := f.readline()).strip():
                    name, _, value = line.decode("utf-8", "replace").partition(":")
                    headers[name.strip()] = value.strip()
                length = int(headers.get("Content-Length", "0"))
                payload = f.read(length)
                if len(payload) < length:
                    raise EOFError("record shorter than its Content-Length")
                record = WarcRecord(headers, payload, body=payload)
                if record.type == "response":
                    record.http_headers, record.body = _split_http(payload)
                yield record
        except (EOFError, gzip.BadGzipFile) as e:
            print(f"warning: {path} ends early ({e}); records before it were read",
                  file=sys.stderr)


def make_response_record(url: str, html_bytes: bytes, content_type: str = "text/html",
                         record_id: int = 0) -> WarcRecord:
    """A `response` record the way a crawler stores one: HTTP headers, a blank line, the page."""
    http = (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(html_bytes)}\r\n\r\n").encode("latin-1")
    payload = http + html_bytes
    headers = {"WARC-Type": "response", "WARC-Target-URI": url,
               "WARC-Date": "2024-01-01T00:00:00Z",
               "WARC-Record-ID": f"<urn:uuid:00000000-0000-4000-8000-{record_id:012d}>",
               "Content-Type": "application/http; msgtype=response",
               "Content-Length": str(len(payload))}
    http_headers, body = _split_http(payload)
    return WarcRecord(headers, payload, http_headers, body)


def write_warc(path: str | os.PathLike, records: Iterable[WarcRecord]) -> None:
    """Write records as WARC/1.0, streaming, each its own gzip member when `path` ends in .gz
    (so a reader can seek to any record); the file appears whole, at the end, or not at all."""
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


def decode_html_bytes(html_bytes: bytes, declared: str | None = None) -> str:
    """UTF-8 if the bytes are valid UTF-8 (most of the web, and ASCII too); else the charset the
    HTTP header or a <meta> tag declares; else Windows-1252, which maps almost every byte, with
    the few undefined bytes replaced: decoding never fails."""
    try:
        return html_bytes.decode("utf-8")
    except UnicodeDecodeError:
        pass
    meta = META_CHARSET.search(html_bytes[:4096])
    for name in (declared, meta and meta.group(1).decode("ascii", "replace")):
        try:
            if name:
                return html_bytes.decode(codecs.lookup(name).name, errors="replace")
        except LookupError:  # an unknown name: try the next guess
            continue
    return html_bytes.decode("cp1252", errors="replace")


class _TextParser(html.parser.HTMLParser):
    """Collect text outside SKIP_TAGS; a block tag ends the current line."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # &amp; -> & and &#233; -> é for us
        self.parts: list[str] = []
        self.skip_depth = 0  # > 0 inside <script>, <nav>, ...

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in SKIP_TAGS:
            self.skip_depth += 1
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)  # a stray </nav> must not go negative
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip_depth:  # a newline in the source is a space; only blocks break lines
            self.parts.append(WHITESPACE.sub(" ", data))


def extract_text_from_html_bytes(html_bytes: bytes, charset: str | None = None) -> str | None:
    """The visible text of a page, one line per paragraph, heading or list item; None when
    nothing is left. `charset` is the HTTP header's, if any (a <meta> tag is read here)."""
    parser = _TextParser()
    parser.feed(decode_html_bytes(html_bytes, charset))
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    text = "\n".join(line for line in lines if line)
    return text or None


def extract_record(record: WarcRecord) -> str | None:
    """Text of a crawl record: HTML responses through the extractor, WET conversions as they are."""
    if record.type == "conversion":
        return record.body.decode("utf-8", errors="replace").strip() or None
    content_type = record.http_headers.get("content-type", "")
    if record.type != "response" or (content_type and "html" not in content_type):
        return None  # warcinfo, request and metadata records, images, PDFs
    declared = HEADER_CHARSET.search(content_type)
    return extract_text_from_html_bytes(record.body, declared and declared.group(1))


# 3. PII: emails, phone numbers, IP addresses ------------------------------------------------------
# The lookarounds stop a match inside a longer token: a phone number in a 14-digit id, an IP in a
# version number 1.2.3.4.5. The masks hold no digits or @, so masking twice counts nothing new.
EMAIL_RE = regex.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
US_PHONE = r"(?:\+?1[-. ]?)?(?:\(\d{3}\)|\d{3})[-. ]?\d{3}[-. ]?\d{4}"
INTL_PHONE = r"\+[2-9]\d{0,2}(?:[-. ]?\(?\d{1,4}\)?){2,5}"  # +44 20 7946 0958, +33 1 23 45 67 89
PHONE_RE = regex.compile(rf"(?<![\w+(])(?:{US_PHONE}|{INTL_PHONE})(?![\w])")
OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"  # 0-255, no leading zeros
IP_RE = regex.compile(rf"(?<![\w.]){OCTET}(?:\.{OCTET}){{3}}(?!\.?\d)")


def mask_emails(text: str) -> tuple[str, int]:
    return EMAIL_RE.subn("|||EMAIL_ADDRESS|||", text)


def _phone_or_keep(match: regex.Match) -> str:
    digits = sum(c.isdigit() for c in match.group())
    return "|||PHONE_NUMBER|||" if 10 <= digits <= 15 else match.group()  # E.164: at most 15


def mask_phone_numbers(text: str) -> tuple[str, int]:
    masked = PHONE_RE.sub(_phone_or_keep, text)
    return masked, masked.count("|||PHONE_NUMBER|||") - text.count("|||PHONE_NUMBER|||")


def mask_ips(text: str) -> tuple[str, int]:
    return IP_RE.subn("|||IP_ADDRESS|||", text)


def mask_pii(text: str) -> tuple[str, dict[str, int]]:
    """All three masks in turn, emails first (their digits must not look like phone numbers)."""
    counts = {}
    for name, mask in (("emails", mask_emails), ("phones", mask_phone_numbers), ("ips", mask_ips)):
        text, counts[name] = mask(text)
    return text, counts


# 4. Gopher quality rules --------------------------------------------------------------------------
# Rae et al. 2021, appendix A: cheap rules that drop pages no human would call prose. Words here
# are whitespace-separated tokens (the paper tokenizes; the thresholds hardly notice).
def gopher_rules(text: str) -> dict[str, bool]:
    """Each rule on its own, True where the text passes it."""
    words = text.split()
    lines = [line for line in text.splitlines() if line.strip()]
    mean_length = sum(map(len, words)) / len(words) if words else 0.0
    ellipsis = sum(line.rstrip().endswith(("...", "\u2026")) for line in lines)
    alphabetic = sum(any(c.isalpha() for c in word) for word in words)
    return {"50 to 100,000 words": 50 <= len(words) <= 100_000,
            "mean word length 3 to 10": 3 <= mean_length <= 10,
            "at most 30% of lines end in ...": 10 * ellipsis <= 3 * len(lines),  # exact
            "at least 80% of words alphabetic": 5 * alphabetic >= 4 * len(words)}


def gopher_quality_filter(text: str) -> bool:
    return all(gopher_rules(text).values())


# 5. Deduplication: exact lines, then MinHash and LSH ----------------------------------------------
def _line_key(line: bytes) -> bytes:
    """8 bytes per distinct line in memory, whatever its length; the newline does not count."""
    return hashlib.blake2b(line.rstrip(b"\r\n"), digest_size=8).digest()


def _check_unique_names(paths: Sequence[Path]) -> None:
    seen = Counter(p.name for p in paths)
    if clash := [name for name, n in seen.items() if n > 1]:
        raise UsageError(f"two input files are both named {clash[0]!r}: outputs keep the names")


def exact_line_deduplication(input_files: Sequence[str | os.PathLike],
                             output_directory: str | os.PathLike) -> int:
    """Keep only the lines that occur exactly once across all files (a line repeated anywhere,
    like a cookie notice or a menu, goes everywhere). Pass 1 counts line hashes, pass 2 writes
    every file under its own name. Returns the number of lines removed."""
    paths = [Path(p) for p in input_files]
    _check_unique_names(paths)
    counts = Counter()
    for path in paths:
        with open(path, "rb") as f:
            counts.update(map(_line_key, f))
    out_dir = Path(output_directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = 0
    for path in paths:
        with open(path, "rb") as f, atomic_output(out_dir / path.name) as tmp, \
                open(tmp, "wb") as out:
            for line in f:
                if counts[_line_key(line)] == 1:
                    out.write(line)
                else:
                    removed += 1
    return removed


PUNCTUATION = regex.compile(r"[\p{P}\p{S}]+")


def normalize_text(text: str) -> str:
    """Lowercase, NFD, accents and punctuation dropped, whitespace collapsed: "Café, déjà-vu!"
    and "cafe deja vu" become the same words, so shingles ignore trivial edits."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(PUNCTUATION.sub(" ", text).split())


def shingles(text: str, ngrams: int) -> set[str]:
    """The set of word n-grams of the normalised text (one shingle if it is shorter)."""
    words = normalize_text(text).split()
    if len(words) <= ngrams:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + ngrams]) for i in range(len(words) - ngrams + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _clusters(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components by union-find: near-duplicates of near-duplicates join one cluster."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees shallow
            i = parent[i]
        return i

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


PRIME = 4_294_967_311  # the smallest prime above 2^32: h(x) = (a x + b) mod PRIME


def hash_functions(num_hashes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The seeded (a, b) of num_hashes universal hashes. a < 2^32 and x < 2^32 keep a x + b
    below 2^64, so numpy's uint64 never wraps around."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 32, num_hashes, dtype=np.uint64)
    b = rng.integers(0, PRIME, num_hashes, dtype=np.uint64)
    return a, b


def _shingle_hash(shingle: str) -> int:
    return int.from_bytes(hashlib.blake2b(shingle.encode(), digest_size=4).digest(), "little")


def minhash_signature_reference(shingle_set: set[str], a: np.ndarray, b: np.ndarray) -> list[int]:
    """For each hash function, the smallest hash over the shingles: two sets agree on it with
    probability equal to their Jaccard similarity (the minimum is equally likely any element)."""
    xs = [_shingle_hash(s) for s in shingle_set]
    return [min(((int(ai) * x + int(bi)) % PRIME for x in xs), default=2**64 - 1)
            for ai, bi in zip(a, b)]


def minhash_signature(shingle_set: set[str], a: np.ndarray, b: np.ndarray,
                      chunk: int = 4096) -> np.ndarray:
    """The same signature, all hash functions at once on a (num_hashes, chunk) array."""
    xs = np.fromiter(map(_shingle_hash, shingle_set), np.uint64, len(shingle_set))
    signature = np.full(len(a), np.iinfo(np.uint64).max, np.uint64)
    for start in range(0, len(xs), chunk):  # bounded memory on very long documents
        x = xs[start:start + chunk]
        signature = np.minimum(signature, ((a[:, None] * x + b[:, None]) % PRIME).min(axis=1))
    return signature


def minhash_clusters(texts: Sequence[str], num_hashes: int, num_bands: int, ngrams: int,
                     jaccard_threshold: float, seed: int = 0) -> list[list[int]]:
    """Near-duplicate clusters without all pairs: documents that share any band of their
    signature are candidates, candidates are verified by true Jaccard, verified pairs joined."""
    if num_bands < 1 or num_hashes % num_bands:
        raise UsageError(f"num_hashes={num_hashes} must split into num_bands={num_bands} equal "
                         f"bands")
    rows = num_hashes // num_bands
    a, b = hash_functions(num_hashes, seed)
    sets = [shingles(t, ngrams) for t in texts]
    buckets: dict[tuple[int, bytes], list[int]] = {}
    for doc, shingle_set in enumerate(sets):  # empty documents share one signature: all merged
        signature = minhash_signature(shingle_set, a, b)
        for band in range(num_bands):
            key = (band, signature[band * rows:(band + 1) * rows].tobytes())
            buckets.setdefault(key, []).append(doc)
    candidates = {(docs[i], docs[j]) for docs in buckets.values() if len(docs) > 1
                  for i in range(len(docs)) for j in range(i + 1, len(docs))}
    verified = [(i, j) for i, j in sorted(candidates)
                if jaccard(sets[i], sets[j]) >= jaccard_threshold]
    return _clusters(len(texts), verified)


def choose_kept(clusters: list[list[int]], seed: int = 0) -> list[int]:
    """One member of each cluster, picked at random with a fixed seed (the same run, same pick)."""
    rng = random.Random(seed)
    return sorted(rng.choice(cluster) for cluster in clusters)


def minhash_deduplication(input_files: Sequence[str | os.PathLike], num_hashes: int,
                          num_bands: int, ngrams: int, jaccard_threshold: float,
                          output_directory: str | os.PathLike, seed: int = 0) -> list[Path]:
    """Write one document of each near-duplicate cluster to output_directory, same file name;
    return the kept input paths."""
    paths = [Path(p) for p in input_files]
    _check_unique_names(paths)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    clusters = minhash_clusters(texts, num_hashes, num_bands, ngrams, jaccard_threshold, seed)
    out_dir = Path(output_directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = [paths[i] for i in choose_kept(clusters, seed)]
    for path in kept:
        write_atomic(out_dir / path.name, path.read_bytes())
    return kept


# 6. The demo: a synthetic crawl, every step on it -------------------------------------------------
WORDS = ("river valley farmers harvest grain autumn village market bread mill water wheel stone "
         "bridge travelers merchants wool cloth winter stories children school teacher lesson "
         "garden apples orchard season weather rain clouds mountain forest path evening lamp "
         "library books history council meeting festival music dance square church tower clock "
         "railway station engine carriage journey letters newspaper printer ink paper").split()
BOILERPLATE = ("<header><a href='/'>Home</a> | <a href='/news'>News</a></header>"
               "<nav><ul><li>Login</li><li>Subscribe</li></ul></nav>"
               "<script>var tracker = {id: 42}; if (a < b) { track(); }</script>"
               "<style>body { font-family: serif; }</style>")
FOOTER = "<footer>&copy; 2024 Valley Gazette. All rights reserved.</footer>"


def _article(rng: random.Random, sentences: int = 12) -> list[str]:
    """Paragraphs of plausible sentences: long enough, alphabetic, no ellipses (Gopher passes)."""
    said = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."
            for _ in range(sentences)]
    return [" ".join(said[i:i + 4]) for i in range(0, sentences, 4)]


def _page(title: str, paragraphs: list[str], charset: str = "utf-8") -> bytes:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return (f"<html><head><meta charset='{charset}'><title>{title}</title></head><body>"
            f"{BOILERPLATE}<article><h1>{title}</h1>{body}"
            f"<p>Share this story with your friends.</p></article>{FOOTER}</body></html>"
            ).encode(charset)


def synthetic_crawl(seed: int = 0) -> list[WarcRecord]:
    """Pages a crawler might bring back: good articles (one in Windows-1252), PII, two near-
    duplicates that change a word or two, and three pages the Gopher rules should drop."""
    rng = random.Random(seed)
    articles = [_article(rng) for _ in range(6)]
    articles[1][1] += (" Write to the editor at editor.desk@valley-gazette.org or call "
                       "(283) 182-3829; our server is at 192.168.10.7, not 256.1.1.1.")
    articles[2][0] += " Reach the council at +44 20 7946 0958 or council@town.gov.uk today."
    near = [articles[0][:], articles[3][:]]
    near[0][0] = near[0][0].replace(" ", " old ", 1)  # one inserted word
    near[1][2] += " Updated in the evening."
    pages = [_page(f"Article {i}", paras) for i, paras in enumerate(articles)]
    pages += [_page("Article 0 (mirror)", near[0]), _page("Article 3 (syndicated)", near[1])]
    pages.append(_page("Caf\u00e9 r\u00e9sum\u00e9", articles[4][:1] + [
        "Notre caf\u00e9 propose un menu d\u00e9j\u00e0 c\u00e9l\u00e8bre dans la vall\u00e9e, "
        "avec des cr\u00eapes et du th\u00e9 pour les voyageurs fatigu\u00e9s du march\u00e9."],
        charset="cp1252"))
    pages.append(_page("Subscribe", ["Click here to subscribe now."]))
    pages.append(_page("Teasers", [f"{' '.join(rng.sample(WORDS, 9))}..." for _ in range(8)]
                       + ["Read more stories below today"]))
    pages.append(_page("Prices", [" ".join(f"{rng.randint(1, 999)} | ${rng.randint(1, 99)}.99"
                                           for _ in range(30))]))
    return [make_response_record(f"https://valley-gazette.example/{i}", page, record_id=i)
            for i, page in enumerate(pages)]


def _short(text: str, width: int = 92) -> str:
    text = text.replace("\n", " / ")
    return text if len(text) <= width else text[:width - 3] + "..."


def demo(out: str = "") -> dict:
    """Every step on the synthetic crawl, with what it removed; returns the counts."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        crawl = root / "crawl.warc.gz"
        write_warc(crawl, synthetic_crawl())
        records = list(iter_warc_records(crawl))
        print(f"1. crawl: wrote and read back {len(records)} response records, "
              f"{crawl.stat().st_size:,} bytes gzipped ({crawl})")
        texts = {r.url.rsplit("/", 1)[1]: extract_record(r) for r in records}
        html_chars = sum(len(r.body) for r in records)
        text_chars = sum(map(len, texts.values()))
        print(f"2. extract: {html_chars:,} bytes of HTML -> {text_chars:,} chars of text "
              f"(scripts, styles, header, nav and footer dropped)\n"
              f"   page 8, declared Windows-1252: {_short(texts['8'].splitlines()[2], 60)}")
        counts = Counter()
        for name, text in texts.items():
            masked, found = mask_pii(text)
            counts.update(found)
            if found and sum(found.values()) >= 3:
                line = next(ln for ln in masked.splitlines() if "|||" in ln)
                print(f"   page {name} masked: ...{line[line.index('|||') - 20:][:72]}...")
            texts[name] = masked
        print(f"3. PII: masked {counts['emails']} emails, {counts['phones']} phone numbers, "
              f"{counts['ips']} IPv4 address(es) (256.1.1.1 is not an IP and stays)")
        failed = {name: [rule for rule, ok in gopher_rules(t).items() if not ok]
                  for name, t in texts.items()}
        for name, rules in failed.items():
            if rules:
                print(f"4. gopher drops page {name}: fails {'; '.join(rules)}: "
                      f"{_short(texts[name], 50)}")
        texts = {name: t for name, t in texts.items() if not failed[name]}
        docs = root / "docs"
        docs.mkdir(exist_ok=True)
        files = []
        for name, text in texts.items():
            write_atomic(docs / f"page{int(name):02d}.txt", text + "\n")
            files.append(docs / f"page{int(name):02d}.txt")
        kept = minhash_deduplication(files, 100, 20, 5, 0.8, root / "minhash")
        names = [p.stem for p in files]
        for cluster in minhash_clusters(list(texts.values()), 100, 20, 5, 0.8):
            if len(cluster) > 1:
                sets = [shingles(list(texts.values())[i], 5) for i in cluster]
                print(f"5. minhash: {' and '.join(names[i] for i in cluster)} are near-"
                      f"duplicates (Jaccard {jaccard(*sets[:2]):.2f}); one kept")
        removed = exact_line_deduplication(kept, root / "exact")
        print(f"6. exact lines: removed {removed} lines seen in two or more documents (the\n"
              f"   'Share this story' line, and the paragraph page 8 quotes from page 4)")
        print(f"kept {len(kept)} of {len(records)} pages: {', '.join(p.stem for p in kept)}")
        return {"records": len(records), **counts, "gopher_dropped": len(records) - len(texts),
                "kept": len(kept), "lines_removed": removed}


# 7. Commands --------------------------------------------------------------------------------------
COMMANDS = {
    "demo": {"out": ""},  # "" keeps nothing: a temporary folder
    "extract": {"input": "", "out": "", "mask": False, "quality": False},  # PII, Gopher
    "dedup": {"input": "", "out": "", "method": "minhash", "num_hashes": 100, "num_bands": 20,
              "ngrams": 5, "jaccard_threshold": 0.8, "seed": 0},
}


def _input_files(spec: str) -> list[Path]:
    """A folder (its files), a glob pattern, or a comma-separated list of files."""
    if Path(spec).is_dir():
        paths = sorted(p for p in Path(spec).iterdir() if p.is_file())
    else:
        paths = [Path(p) for part in spec.split(",") for p in sorted(glob.glob(part)) or [part]]
    if missing := [p for p in paths if not p.is_file()]:
        raise UsageError(f"input file {missing[0]} does not exist")
    if not paths:
        raise UsageError(f"no input files in {spec}")
    return paths


def extract(input: str, out: str, mask: bool, quality: bool) -> None:
    """Text files from crawl files, optionally PII-masked and Gopher-filtered."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = dropped = 0
    for path in _input_files(input):
        for record in iter_warc_records(path):
            text = extract_record(record)
            if text and mask:
                text = mask_pii(text)[0]
            if text is None or quality and not gopher_quality_filter(text):
                dropped += record.type in ("response", "conversion")
                continue
            write_atomic(out_dir / f"{written:06d}.txt", text + "\n")
            written += 1
    print(f"wrote {written} documents to {out_dir}, dropped {dropped}")


def main(argv: list[str]) -> None:
    """`python data.py [COMMAND] [--key=value ...]`; no command runs the demo."""
    if "-h" in argv or "--help" in argv:
        return print(__doc__)
    command, cfg, _, _ = parse_command(argv, COMMANDS, "demo")
    if missing := [key for key, value in cfg.items() if value == "" and key != "out" or
                   key == "out" and command != "demo" and not value]:
        raise UsageError(f"{command} needs --{missing[0]}=...")
    if command == "demo":
        demo(cfg["out"])
    elif command == "extract":
        extract(**cfg)
    elif cfg["method"] == "exact":
        removed = exact_line_deduplication(_input_files(cfg["input"]), cfg["out"])
        print(f"removed {removed} repeated lines; files written to {cfg['out']}")
    elif cfg["method"] == "minhash":
        paths = _input_files(cfg["input"])
        kept = minhash_deduplication(paths, cfg["num_hashes"], cfg["num_bands"], cfg["ngrams"],
                                     cfg["jaccard_threshold"], cfg["out"], cfg["seed"])
        print(f"kept {len(kept)} of {len(paths)} documents in {cfg['out']}")
    else:
        raise UsageError(f"--method must be exact or minhash, got {cfg['method']!r}")


if __name__ == "__main__":
    run_cli(main)
