"""The text corpus: fixed calibration and held-out evaluation splits, rebuilt reproducibly.

Every number the agent produces comes down to how well the model predicts some text: block
importance (perplexity with a block gone), the policy's reward, an adapter's quality. Those
numbers only compare if the text is the same text every time, and held-out numbers only mean
something if that text never reached calibration or training. No model hub or web is reachable,
so the corpus is assembled from text that ships offline:

- `python`: Python's own reference prose (`pydoc_data.topics`, one document per section) and
  a fixed list of standard-library modules (code: one document per function or class, a long
  class per method);
- Debian packages, each fetched with `apt-get download` and unpacked with `dpkg-deb -x` (no
  root install): `python3.11-doc` (tutorial, FAQ as question/answer pairs, glossary),
  `fortunes` (with its dependency `fortunes-min`: one document per fortune), `jargon-text` and
  `dict-devil` (definitions), `debian-faq` (question/answer pairs).

The per-source text extraction (reST rendering, code units, dictionaries) is in
`elasticfleet.agent.corpus_sources`; this module fetches, deduplicates, splits, writes and reads.

Each document carries a domain label (`DOMAINS`) that later work builds adapter tasks from. For
the `qa` and `definitions` domains the first line of the text is the question or the term, then
a blank line, then the answer or definition (`Document.head`, `Document.body`).

Whole documents are assigned to a split by a hash of their id, never by random state, so the
assignment is the same on every machine and barely moves when the inputs change. Held-out text
must not leak into calibration under another name, so before splitting, exact duplicates
(whitespace and case folded) are collapsed, and documents that share any line of `SHARED_LINE`
or more characters are grouped and split together (by the hash of the group's first id). Files
are written in an order given by another hash of the id: any prefix of a split is a mix of all
its domains, which is what an evaluator that takes the first N token windows wants.

The corpus lives in the cache (`worker.cachedir.default_cache_root()` / corpus / NAME), never in
git. A `manifest.json` records every file's size and sha256, the document and character counts
per split and domain, the versions of the inputs and the builder format. It is written last
and the directory is renamed into place only once it verifies; a valid corpus makes a rebuild
a no-op, and a corrupt one is an error that says to rebuild with force (silently replacing it
could change the held-out set under a running comparison).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from elasticfleet.agent.corpus_sources import STDLIB_MODULES as STDLIB_MODULES
from elasticfleet.agent.corpus_sources import CorpusError as CorpusError
from elasticfleet.agent.corpus_sources import Document as Document
from elasticfleet.agent.corpus_sources import (
    debian_documents,
    fortune_documents,
    python_documents,
)
from elasticfleet.worker.model.cachedir import (
    MANIFEST,
    default_cache_root,
    rebuild,
    sha256_file,
    verify_files,
)
from elasticfleet.worker.model.cachedir import read_manifest as _read_manifest

#: Bump when a change to extraction, cleaning or splitting changes the files.
FORMAT_VERSION = 1
SPLITS = ("calibration", "evaluation")
DOMAINS = ("prose", "code", "qa", "definitions", "fortunes")
PYTHON_SOURCE = "python"
#: The Debian sources, by package name.
DEBIAN_SOURCES = ("python3.11-doc", "fortunes", "jargon-text", "dict-devil", "debian-faq")
ALL_SOURCES = (PYTHON_SOURCE, *DEBIAN_SOURCES)
#: Share of documents held out for evaluation.
EVAL_FRACTION = 0.1
#: Documents sharing a line this long (whitespace and case folded) go to one split together.
SHARED_LINE = 60
#: Text between documents when a split is read as one token stream: a paragraph break, so a
#: window that spans two documents reads like prose and the model's special tokens stay out.
SEPARATOR = "\n\n"
BUILD_COMMAND = "elasticfleet corpus build"
SPLIT_FILES = {split: f"{split}.jsonl" for split in SPLITS}

# Part of every split and order hash: changing it reshuffles everything, so it is versioned.
_SALT = "elasticfleet-corpus-1"
# `fortunes` holds the genre files; the classic `fortunes`, `literature` and `riddles` files
# are in its dependency `fortunes-min`, which Debian always installs with it.
_PACKAGES = {
    "python3.11-doc": ("python3.11-doc",),
    "fortunes": ("fortunes-min", "fortunes"),
    "jargon-text": ("jargon-text",),
    "dict-devil": ("dict-devil",),
    "debian-faq": ("debian-faq",),
}


# --- splits --------------------------------------------------------------------------------


def _unit_hash(purpose: str, doc_id: str) -> float:
    digest = hashlib.sha256(f"{_SALT}\0{purpose}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_of(group_id: str) -> str:
    return "evaluation" if _unit_hash("split", group_id) < EVAL_FRACTION else "calibration"


def _canonical_sources(sources: Iterable[str]) -> tuple[str, ...]:
    requested = set(sources)
    unknown = sorted(requested - set(ALL_SOURCES))
    if unknown:
        raise ValueError(
            f"unknown corpus source(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(ALL_SOURCES)}"
        )
    if not requested:
        raise ValueError("no corpus sources given")
    # Canonical order, so ("fortunes", "python") and ("python", "fortunes") are one corpus.
    return tuple(s for s in ALL_SOURCES if s in requested)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def corpus_dir(cache_root: Path | None = None, sources: Sequence[str] = ALL_SOURCES) -> Path:
    """Where the corpus built from `sources` lives: `<cache root>/corpus/all` for the full
    corpus, `<cache root>/corpus/python` (and so on) for a subset, so a partial build can never
    be mistaken for the full one."""
    names = _canonical_sources(sources)
    name = "all" if names == ALL_SOURCES else "+".join(names)
    return (cache_root or default_cache_root()) / "corpus" / name


# --- fetching Debian packages --------------------------------------------------------------


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # C locale: apt's "Candidate:" is translated otherwise.
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600
    )


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout).strip().splitlines()
    return " / ".join(lines[-3:]) or f"exit status {result.returncode}"


class _Apt:
    """Downloads .deb files with `apt-get download` into a cache folder that outlives builds,
    so a rebuild (or `force`) needs no network. A cached .deb is used as is: delete the folder
    to take newer package versions."""

    def __init__(self, debs: Path) -> None:
        self.debs = debs
        self._updated = False
        missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if not shutil.which(tool)]
        if missing:
            raise CorpusError(
                f"the Debian sources need {', '.join(missing)} (a Debian or Ubuntu system); "
                f"build from the Python sources alone with `{BUILD_COMMAND} --sources python` "
                "(sources=('python',))"
            )

    def _fields(self, deb: Path) -> dict[str, str] | None:
        result = _run(["dpkg-deb", "--field", str(deb), "Package", "Version"])
        if result.returncode != 0:
            return None
        fields = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
        return fields if {"Package", "Version"} <= set(fields) else None

    def _candidates(self, packages: list[str]) -> set[str]:
        """Those of `packages` the apt lists offer (one `apt-cache policy` call for all)."""
        result = _run(["apt-cache", "policy", *packages])
        found = re.finditer(r"^(\S+):\n(?:[ \t].*\n)*?\s+Candidate:\s*(\S+)", result.stdout, re.M)
        return {m.group(1) for m in found if m.group(2) != "(none)"} & set(packages)

    def _update(self, packages: list[str], why: str) -> None:
        """`apt-get update`, at most once per build and only as root; otherwise the error
        names the command to run."""
        if self._updated or os.geteuid() != 0:
            hint = "" if self._updated else "run `sudo apt-get update` and build again, or "
            raise CorpusError(
                f"Debian package{'s' if len(packages) > 1 else ''} {', '.join(packages)} cannot "
                f"be had: {why}; {hint}build from the Python sources alone with "
                f"`{BUILD_COMMAND} --sources python` (sources=('python',))"
            )
        print(
            f"elasticfleet corpus: {why}; running `apt-get update` (as root)",
            file=sys.stderr,
            flush=True,
        )
        self._updated = True
        result = _run(["apt-get", "update"])
        if result.returncode != 0:
            raise CorpusError(f"`apt-get update` failed: {_tail(result)}")

    def fetch(self, packages: list[str]) -> dict[str, tuple[Path, dict[str, str]]]:
        """Each package's cached .deb (downloading the missing ones, all in one `apt-get
        download`: apt's start-up dominates) and its control fields."""
        self.debs.mkdir(parents=True, exist_ok=True)
        found: dict[str, tuple[Path, dict[str, str]]] = {}
        for package in packages:
            for cached in sorted(self.debs.glob(f"{package}_*.deb")):
                if (fields := self._fields(cached)) and fields["Package"] == package:
                    found[package] = (cached, fields)
                    break
                cached.unlink()  # unreadable: a partial download from an earlier run
        missing = [p for p in packages if p not in found]
        if not missing:
            return found
        while absent := [p for p in missing if p not in self._candidates(missing)]:
            self._update(absent, "not in this system's apt package lists")
        with tempfile.TemporaryDirectory(dir=self.debs, prefix=".download-") as folder:
            command = ["apt-get", "download", *missing]
            while (result := _run(command, cwd=Path(folder))).returncode:
                self._update(missing, f"`{' '.join(command)}` failed ({_tail(result)})")
            for package in missing:
                downloaded = sorted(Path(folder).glob(f"{package}_*.deb"))
                fields = self._fields(downloaded[0]) if len(downloaded) == 1 else None
                if fields is None or fields["Package"] != package:
                    raise CorpusError(f"`apt-get download {package}` gave no readable .deb")
                deb = self.debs / downloaded[0].name
                downloaded[0].replace(deb)
                found[package] = (deb, fields)
        return found

    def unpack(self, deb: Path, into: Path) -> None:
        result = _run(["dpkg-deb", "-x", str(deb), str(into)])
        if result.returncode != 0:
            raise CorpusError(
                f"`dpkg-deb -x {deb.name}` failed ({_tail(result)}); delete {deb} and build again"
            )


# --- building ------------------------------------------------------------------------------


def _collect(
    names: tuple[str, ...], debs: Path, scratch: Path, progress: bool
) -> tuple[list[Document], dict[str, Any]]:
    documents: list[Document] = []
    inputs: dict[str, Any] = {}
    apt = _Apt(debs) if any(name in DEBIAN_SOURCES for name in names) else None
    bar = tqdm(names, desc="corpus", unit="source", disable=not progress, file=sys.stderr)
    wanted = [package for name in names for package in _PACKAGES.get(name, ())]
    if apt is not None:
        bar.set_postfix_str("apt-get download")
    # Every package first, so a missing one fails the build before any slow work.
    fetched = apt.fetch(wanted) if apt is not None else {}
    for name in bar:
        bar.set_postfix_str(name)
        if name == PYTHON_SOURCE:
            documents.extend(python_documents())
            inputs[name] = {
                "python": ".".join(map(str, sys.version_info[:3])),
                "stdlib_modules": list(STDLIB_MODULES),
            }
            continue
        assert apt is not None
        packages: dict[str, Any] = {}
        for package in _PACKAGES[name]:
            deb, fields = fetched[package]
            root = scratch / package
            apt.unpack(deb, root)
            packages[package] = {"version": fields["Version"], "deb_sha256": sha256_file(deb)}
            # fortunes-min and fortunes both hold fortune files; the other sources are one
            # package each, extracted once its last package is unpacked.
            if name == "fortunes":
                documents.extend(fortune_documents(root, package))
            elif package == _PACKAGES[name][-1]:
                documents.extend(debian_documents(name, root, package))
        inputs[name] = {"packages": packages}
    return documents, inputs


def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()


def _deduplicate(documents: list[Document]) -> tuple[list[Document], int]:
    """Drop empty documents and all but the first (by id) of each folded text, so one text
    cannot reach both splits under two ids. Ids must be unique."""
    kept: list[Document] = []
    seen: set[str] = set()
    ids: set[str] = set()
    dropped = 0
    for doc in sorted(documents, key=lambda d: d.id):
        if doc.id in ids:
            raise CorpusError(f"two documents share the id {doc.id!r}")
        ids.add(doc.id)
        key = hashlib.sha256(_fold(doc.text).encode()).hexdigest()
        if not doc.text.strip() or key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(doc)
    return kept, dropped


def _overlap_groups(documents: list[Document]) -> dict[str, str]:
    """Each document's group: the smallest id among the documents it shares a line of
    `SHARED_LINE` or more characters with, directly or through others. A whole group goes to
    one split, so text repeated across documents (a fortune filed under two genres with
    different attributions, a docstring copied between methods) cannot be on both sides.
    Groups are small here (the largest, 80 fortunes), so the split ratio holds."""
    parent = {doc.id: doc.id for doc in documents}

    def root(doc_id: str) -> str:
        while parent[doc_id] != doc_id:
            parent[doc_id] = parent[parent[doc_id]]  # path halving
            doc_id = parent[doc_id]
        return doc_id

    owner: dict[str, str] = {}
    for doc in documents:  # sorted by id, so the smaller id always ends up the root
        for line in doc.text.split("\n"):
            key = _fold(line)
            if len(key) < SHARED_LINE:
                continue
            other = owner.setdefault(key, doc.id)
            first, second = sorted((root(other), root(doc.id)))
            parent[second] = first
    return {doc.id: root(doc.id) for doc in documents}


def _counts(documents: Iterable[Document]) -> dict[str, Any]:
    domains: dict[str, dict[str, int]] = {}
    for doc in documents:
        entry = domains.setdefault(doc.domain, {"documents": 0, "characters": 0})
        entry["documents"] += 1
        entry["characters"] += len(doc.text)
    return {
        "documents": sum(d["documents"] for d in domains.values()),
        "characters": sum(d["characters"] for d in domains.values()),
        "domains": domains,
    }


def _write_corpus(
    out: Path, names: tuple[str, ...], documents: list[Document], inputs: dict[str, Any]
) -> None:
    """Write both splits and, last, the manifest into the (temporary) directory `out`. Nothing
    in the files depends on time or machine, so two builds from the same inputs are identical
    byte for byte."""
    kept, dropped = _deduplicate(documents)
    unknown = {doc.domain for doc in kept} - set(DOMAINS)
    if unknown:
        raise AssertionError(f"unlabelled domains {unknown}")
    group = _overlap_groups(kept)
    by_split: dict[str, list[Document]] = {split: [] for split in SPLITS}
    for doc in kept:
        by_split[_split_of(group[doc.id])].append(doc)
    files: dict[str, Any] = {}
    out.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable by all
    for split, docs in by_split.items():
        docs.sort(key=lambda d: (_unit_hash("order", d.id), d.id))
        path = out / SPLIT_FILES[split]
        with path.open("w", encoding="utf-8", newline="\n") as handle:
            for doc in docs:
                record = {
                    "id": doc.id,
                    "domain": doc.domain,
                    "source": doc.source,
                    "text": doc.text,
                }
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename publishes it
        path.chmod(0o644)
        files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "sources": list(names),
        "inputs": inputs,
        "eval_fraction": EVAL_FRACTION,
        "separator": SEPARATOR,
        "duplicates_dropped": dropped,
        "splits": {split: _counts(docs) for split, docs in by_split.items()},
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (out / MANIFEST).chmod(0o644)


def _corrupt(path: Path, problem: str) -> CorpusError:
    return CorpusError(f"corpus file {path}: {problem}; rebuild it with `{BUILD_COMMAND} --force`")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the corpus directory `path`, checked for format and completeness."""
    return _read_manifest(
        path, format_version=FORMAT_VERSION, files=SPLIT_FILES.values(), corrupt=_corrupt
    )


def verify_corpus(path: Path) -> dict[str, Any]:
    """Check every split file against the manifest (size and sha256; about 10 ms per MB) and
    return the manifest. Raises CorpusError naming the bad file."""
    manifest = read_manifest(path)
    verify_files(path, manifest, deep=True, corrupt=_corrupt)
    return manifest


def _existing(target: Path, force: bool) -> bool:
    """True if a valid corpus is already at `target` and there is nothing to do."""
    if force or not target.exists():
        return False
    verify_corpus(target)  # raises on corruption: rebuilding silently could move the held-out set
    return True


def build_corpus(
    cache_root: Path | None = None,
    *,
    force: bool = False,
    sources: Sequence[str] = ALL_SOURCES,
    progress: bool = True,
) -> Path:
    """Build the corpus from `sources` into the cache and return its directory.

    A valid existing corpus is left untouched. A corrupt one raises CorpusError unless `force`,
    which rebuilds it. The Debian sources need `apt-get`/`dpkg-deb` and reachable apt sources
    the first time (their .deb files are cached under `<cache root>/corpus/debs`); without
    them the build fails rather than build a different corpus: pass `sources=("python",)` to
    build from the Python sources alone (a separate corpus directory). If the apt lists lack a
    package, the build runs `apt-get update` once when it is root (and says so on stderr);
    otherwise the error names the command to run.
    """
    names = _canonical_sources(sources)
    target = corpus_dir(cache_root, names)
    if _existing(target, force):
        return target
    parent = target.parent

    def write(staging: Path) -> None:
        with tempfile.TemporaryDirectory(
            prefix=f".{target.name}.unpack-", suffix=".tmp", dir=parent
        ) as scratch:
            documents, inputs = _collect(names, parent / "debs", Path(scratch), progress)
        _write_corpus(staging, names, documents, inputs)

    return rebuild(
        target,
        write=write,
        verify=verify_corpus,
        # Another build may have finished while we waited for the lock.
        current=lambda: not force and _existing(target, force=False),
    )


# --- reading -------------------------------------------------------------------------------


def _open_corpus(cache_root: Path | None, sources: Sequence[str]) -> Path:
    path = corpus_dir(cache_root, sources)
    if not path.exists():
        raise CorpusError(
            f"no corpus at {path}; build it with `{BUILD_COMMAND}` "
            "(elasticfleet.agent.corpus.build_corpus)"
        )
    verify_corpus(path)
    return path


def load_split(
    split: str, cache_root: Path | None = None, *, sources: Sequence[str] = ALL_SOURCES
) -> list[Document]:
    """The documents of one split, in the corpus's fixed (hash-shuffled) order, after checking
    the files against the manifest. `evaluation` is the held-out split: never calibrate or
    train on it."""
    _check_split(split)
    path = _open_corpus(cache_root, sources)
    documents = []
    with (path / SPLIT_FILES[split]).open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            documents.append(
                Document(record["id"], record["domain"], record["source"], record["text"])
            )
    return documents


def token_windows(
    split: str,
    tokenizer: Tokenizer,
    window: int,
    count: int | None,
    *,
    cache_root: Path | None = None,
    domains: Sequence[str] | None = None,
    sources: Sequence[str] = ALL_SOURCES,
) -> torch.Tensor:
    """Non-overlapping token windows [N, window] (int64) from one split.

    The split's documents (only `domains`, if given) are read in their fixed order, each
    followed by `SEPARATOR`, tokenized without special tokens and concatenated; the stream is
    cut into windows from the start and a final partial window is dropped. `count` takes the
    first `count` windows (a representative mix: documents are stored hash-shuffled) and is
    an error if the split has fewer; None takes them all. Deterministic for a given corpus and
    tokenizer.
    """
    _check_split(split)
    if window < 1:
        raise ValueError(f"window must be at least 1 token, got {window}")
    if count is not None and count < 0:
        raise ValueError(f"count must be non-negative or None, got {count}")
    if domains is not None:
        unknown = sorted(set(domains) - set(DOMAINS))
        if unknown:
            raise ValueError(
                f"unknown domain(s) {', '.join(map(repr, unknown))}; known: {', '.join(DOMAINS)}"
            )
    wanted = set(DOMAINS if domains is None else domains)
    documents = [
        doc for doc in load_split(split, cache_root, sources=sources) if doc.domain in wanted
    ]
    need = None if count is None else count * window
    ids: list[int] = []
    batch = 256
    for start in range(0, len(documents), batch):
        if need is not None and len(ids) >= need:
            break  # tokenizing all of calibration (millions of tokens) only to drop it is waste
        texts = [doc.text + SEPARATOR for doc in documents[start : start + batch]]
        for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
            ids.extend(encoding.ids)
    available = len(ids) // window
    if count is not None and count > available:
        raise CorpusError(
            f"the {split} split{'' if domains is None else ' (' + ', '.join(domains) + ')'} has "
            f"{available} windows of {window} tokens, {count} were asked for"
        )
    taken = available if count is None else count
    return torch.tensor(ids[: taken * window], dtype=torch.long).view(taken, window)


def summary(path: Path) -> str:
    """A plain-text table of documents and characters per split and domain, from the
    manifest (for the command line)."""
    manifest = read_manifest(path)
    rows = [f"{'split':<12} {'domain':<12} {'documents':>10} {'characters':>12}"]
    for split in SPLITS:
        counts = manifest["splits"][split]
        for domain in DOMAINS:
            entry = counts["domains"].get(domain)
            if entry:
                rows.append(
                    f"{split:<12} {domain:<12} {entry['documents']:>10} {entry['characters']:>12}"
                )
        rows.append(
            f"{split:<12} {'(all)':<12} {counts['documents']:>10} {counts['characters']:>12}"
        )
    return "\n".join(rows)
