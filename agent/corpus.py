"""The text corpus: fixed calibration and held-out evaluation splits, rebuilt reproducibly.

Every number the agent produces comes down to how well the model predicts some text: block
importance (perplexity with a block gone), the policy's reward, an adapter's quality. Those
numbers only compare if the text is the same text every time, and held-out numbers only mean
something if that text never reached calibration or training. No model hub or web is reachable,
so the corpus is assembled from text that ships offline (DESIGN.md, "The model and the data"):

- `python`: Python's own reference prose (`pydoc_data.topics`, one document per section) and
  a fixed list of standard-library modules (code: one document per function or class, a long
  class per method);
- Debian packages, each fetched with `apt-get download` and unpacked with `dpkg-deb -x` (no
  root install): `python3.11-doc` (tutorial, FAQ as question/answer pairs, glossary),
  `fortunes` (with its dependency `fortunes-min`: one document per fortune), `jargon-text` and
  `dict-devil` (definitions), `debian-faq` (question/answer pairs).

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

import ast
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from elasticfleet.worker.cachedir import (
    MANIFEST,
    default_cache_root,
    rebuild,
    sha256_file,
    verify_files,
)
from elasticfleet.worker.cachedir import read_manifest as _read_manifest

#: Bump when a change to extraction, cleaning or splitting changes the files.
FORMAT_VERSION = 1
SPLITS = ("calibration", "evaluation")
DOMAINS = ("prose", "code", "qa", "definitions", "fortunes")
PYTHON_SOURCE = "python"
#: The Debian sources, by the package name DESIGN.md gives them.
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
#: Standard-library modules used as code: single-file, pure-Python modules that exist under
#: the same path from 3.11 on (none that later became packages, such as pathlib or zipfile),
#: about 1.4 MB in all. An explicit list rather than a directory listing, so the corpus does
#: not change with whatever else an interpreter happens to ship.
STDLIB_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "cmd", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "difflib", "enum", "fnmatch", "fractions",
    "functools", "gettext", "glob", "graphlib", "gzip", "heapq", "hmac", "ipaddress",
    "linecache", "numbers", "operator", "optparse", "pprint", "queue", "random", "reprlib",
    "sched", "secrets", "selectors", "shlex", "shutil", "statistics", "string", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "types", "typing", "uuid", "warnings",
    "weakref",
)  # fmt: skip


class CorpusError(RuntimeError):
    """The corpus cannot be built, is missing, or does not match its manifest."""


@dataclass(frozen=True)
class Document:
    """One unit of text; a document is wholly in one split."""

    id: str
    domain: str
    source: str
    text: str

    @property
    def head(self) -> str:
        """The first line: the question (qa) or the term (definitions)."""
        return self.text.partition("\n")[0]

    @property
    def body(self) -> str:
        """Everything after the first line and the blank line after it."""
        return self.text.partition("\n")[2].lstrip("\n")


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


# --- text cleaning -------------------------------------------------------------------------


def _tidy(text: str) -> str:
    """Uniform whitespace: no trailing spaces, no non-breaking spaces (the Jargon File is full
    of them), at most one blank line in a row, no blank lines at either end. Leading
    indentation is kept: it is code structure, or a fortune's attribution."""
    text = text.replace("\r\n", "\n").replace("\xa0", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "untitled"


class _Ids:
    """Makes ids unique within a source by numbering repeats (two entries for one term)."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def __call__(self, doc_id: str) -> str:
        count = self._seen.get(doc_id, 0) + 1
        self._seen[doc_id] = count
        return doc_id if count == 1 else f"{doc_id}~{count}"


# reStructuredText (python3.11-doc ships its Sphinx sources as _sources/*.rst.txt). The text is
# rendered roughly as Sphinx would show it, so the model sees prose rather than markup.
_ADORNMENT = re.compile(r"^([=\-~^*+#\"'`:.])\1{2,}\s*$")
# One pass, left to right, so nothing inside a ``literal`` is touched.
_INLINE = re.compile(
    r"``(?P<literal>(?:(?!``).)+?)``"
    r"|:(?P<role>(?:[\w.+-]+:)*?[\w.+-]+):`(?P<content>[^`]+)`"
    r"|`(?P<link>[^`<]+?)\s*<[^>`]+>`__?"
    r"|`(?P<ref>[^`]+)`__?"
    r"|\s*\[(?:#\w*|\d+)\]_"
    r"|\\(?P<escaped>.)",
    flags=re.S,
)
_DIRECTIVE = re.compile(r"^(\s*)\.\.(?:\s+(.*))?$")
_DIRECTIVE_NAME = re.compile(r"^([\w:-]+)::\s*(.*)$")
# Directives whose whole block is markup, not text.
_DROP_DIRECTIVES = {
    "index", "toctree", "contents", "highlight", "sectionauthor", "moduleauthor",
    "codeauthor", "raw", "image", "figure", "tabularcolumns", "include", "literalinclude",
    "testsetup", "testcleanup", "module", "currentmodule", "glossary", "productionlist",
}  # fmt: skip
# Directives whose block is code, kept verbatim.
_CODE_DIRECTIVES = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput"}
# Roles Sphinx renders with a trailing "()".
_CALLABLE_ROLES = {"func", "meth", "py:func", "py:meth", "c:func"}
# Directives whose block is kept, introduced the way Sphinx renders them.
_DIRECTIVE_LABELS = {
    "note": "Note:",
    "warning": "Warning:",
    "seealso": "See also:",
    "important": "Important:",
    "tip": "Tip:",
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _role(role: str, content: str) -> str:
    if titled := re.fullmatch(r"(.*?)\s*<[^>]*>", content, flags=re.S):
        return titled.group(1)
    content = content.lstrip("!")
    if content.startswith("~"):
        content = content[1:].rsplit(".", 1)[-1]
    if role in ("pep", "rfc"):
        return f"{role.upper()} {content}"
    if role in _CALLABLE_ROLES and not content.endswith(")"):
        return f"{content}()"
    return content


def _inline(match: re.Match[str]) -> str:
    if (literal := match.group("literal")) is not None:
        return literal
    if (role := match.group("role")) is not None:
        return _role(role, match.group("content"))
    if (link := match.group("link")) is not None:
        return link
    if (ref := match.group("ref")) is not None:
        return ref
    if (escaped := match.group("escaped")) is not None:
        return "" if escaped.isspace() else escaped  # an escaped space separates markup
    return ""  # a footnote reference


def _rst_inline(text: str) -> str:
    """Roles, links, literals and escapes as their rendered text."""
    return _INLINE.sub(_inline, text)


def _rst_text(text: str) -> str:
    """reST body to text: drop directive markup and comments, keep literal blocks verbatim,
    turn `::` into `:`, and render inline markup paragraph by paragraph (a role or link may
    wrap across lines)."""
    lines = text.split("\n")
    marked: list[tuple[str, bool]] = []  # (line, verbatim)
    literal_under: int | None = None  # indentation of the line that opened a literal block
    i = 0
    while i < len(lines):
        line = lines[i]
        if literal_under is not None:
            if not line.strip() or _indent(line) > literal_under:
                marked.append((line, True))
                i += 1
                continue
            literal_under = None
        directive = _DIRECTIVE.match(line)
        if directive is None:
            stripped = line.rstrip()
            if stripped.endswith("::"):
                # The block is indented past the paragraph's text, which in a list item
                # starts after the bullet.
                bullet = re.match(r"\s*(?:[*+-]|\d+\.|#\.)\s+", line)
                literal_under = len(bullet.group(0)) if bullet else _indent(line)
                if stripped.strip() == "::":
                    stripped = ""
                else:
                    stripped = stripped[:-3] if stripped.endswith(" ::") else stripped[:-1]
            marked.append((stripped, False))
            i += 1
            continue
        indent = len(directive.group(1))
        named = _DIRECTIVE_NAME.match(directive.group(2) or "")
        name, argument = (named.group(1), named.group(2)) if named else (None, "")
        i += 1
        # Options (":linenos:") belong to the directive, not the text.
        while i < len(lines) and _indent(lines[i]) > indent and lines[i].lstrip().startswith(":"):
            i += 1
        if name is None or name in _DROP_DIRECTIVES:
            # A comment, a link target or pure markup: skip its indented block too.
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
                i += 1
            marked.append(("", False))
        elif name in _CODE_DIRECTIVES:
            literal_under = indent
        elif label := _DIRECTIVE_LABELS.get(name):
            marked.append((" " * indent + label.format(argument.strip()), False))
    out: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        # A paragraph that starts with ">>>" is a doctest block: verbatim, like a literal.
        if paragraph and paragraph[0].lstrip().startswith(">>>"):
            out.extend(paragraph)
        elif paragraph:
            out.append(_rst_inline("\n".join(paragraph)))
        paragraph.clear()

    for line, verbatim in marked:
        if verbatim or not line.strip():
            flush()
            out.append(line)
        else:
            paragraph.append(line)
    flush()
    return _tidy("\n".join(out))


def _rst_sections(text: str) -> list[tuple[str, str, str]]:
    """Split reST at section titles: (underline character, title, body) per section, in order.
    Text before the first title has an empty title. An overlined title's character is marked
    with a leading "^" (overline and underline), as reST tells levels apart that way too."""
    lines = text.split("\n")
    sections: list[tuple[str, str, str]] = []
    mark, title, body = "", "", []
    i = 0
    while i < len(lines):
        line = lines[i]
        after = lines[i + 1] if i + 1 < len(lines) else ""
        before_blank = i == 0 or not lines[i - 1].strip()
        found: tuple[str, str, int] | None = None
        if (
            _ADORNMENT.match(line)
            and i + 2 < len(lines)
            and lines[i + 1].strip()
            and lines[i + 2].rstrip() == line.rstrip()
        ):
            found = ("^" + line[0], lines[i + 1].strip(), 3)
        elif (
            before_blank
            and line.strip()
            and not line[0].isspace()
            and not _ADORNMENT.match(line)
            and _ADORNMENT.match(after)
        ):
            found = (after[0], line.strip(), 2)
        if found is None:
            body.append(line)
            i += 1
            continue
        sections.append((mark, title, "\n".join(body)))
        mark, title, i = found[0], found[1], i + found[2]
        body = []
    sections.append((mark, title, "\n".join(body)))
    return sections


def _glossary(text: str) -> Iterator[tuple[str, str]]:
    """(term, definition) pairs from a Sphinx `.. glossary::` block: terms indented 3, their
    definitions indented further; consecutive term lines are aliases of one entry."""
    lines = text.split("\n")
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == ".. glossary::")
    except StopIteration:
        raise CorpusError("python3.11-doc: glossary.rst.txt has no glossary block") from None
    terms: list[str] = []
    body: list[str] = []
    for line in [*lines[start + 1 :], "END"]:
        if not line.strip():
            body.append("")
            continue
        indent = _indent(line)
        if indent > 3:
            body.append(line)
            continue
        if terms and any(b.strip() for b in body):
            definition = _rst_text(textwrap.dedent("\n".join(body)))
            yield ", ".join(_rst_inline(t) for t in terms), definition
            terms, body = [], []
        if indent == 0:
            break
        if not line.lstrip().startswith(":"):  # skip the directive's own options
            terms.append(line.strip())


# --- Python sources ------------------------------------------------------------------------


#: A class longer than this is split into its methods and the rest of the class body.
_WHOLE_CLASS_LINES = 80
_Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _lines_of(node: _Definition) -> tuple[int, int]:
    """0-based [first, last) source lines of a definition, decorators included."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
    return first, node.end_lineno or node.lineno


def _module_documents(name: str, path: Path) -> Iterator[Document]:
    """Code in units small enough that a 10% hash split holds out about 10% of it: one
    document per top-level function, per class (a long class: per method, plus the rest of
    the class body), and one for the rest of the module (docstring, imports, constants).
    Each is the source text as written, indentation included."""
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorpusError(
            f"standard-library module {name} is missing ({path}); the corpus needs Python "
            f"{sys.version_info.major}.{sys.version_info.minor}'s full standard library"
        ) from None
    lines = source.split("\n")
    covered = [False] * len(lines)
    ids = _Ids()

    def take(doc_id: str, first: int, last: int) -> Document:
        """Lines [first, last) not already in a document: a whole definition, or what is left
        of a class once its methods are taken, or of the module once its definitions are."""
        text = "\n".join(lines[i] for i in range(first, last) if not covered[i])
        covered[first:last] = [True] * (last - first)
        return Document(ids(doc_id), "code", "stdlib", _tidy(text))

    for node in ast.parse(source, filename=str(path)).body:
        if not isinstance(node, _Definition):
            continue
        first, last = _lines_of(node)
        if isinstance(node, ast.ClassDef) and last - first > _WHOLE_CLASS_LINES:
            for member in node.body:
                if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield take(f"stdlib:{name}.{node.name}.{member.name}", *_lines_of(member))
        yield take(f"stdlib:{name}.{node.name}", first, last)
    yield take(f"stdlib:{name}", 0, len(lines))


def _python_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    ids = _Ids()
    for key in sorted(topics):
        # Topics are plain text with reST-style underlined titles; the long ones (special
        # method names: 60 kB) are split at them, so no one topic swings the held-out share.
        for _, title, body in _rst_sections(topics[key]):
            text = _tidy(body)
            if text:
                doc_id = ids(f"pydoc:{key}/{_slug(title)}" if title else f"pydoc:{key}")
                yield Document(doc_id, "prose", "pydoc_data", f"{title}\n\n{text}".strip())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_MODULES:
        yield from _module_documents(name, stdlib / f"{name}.py")


# --- Debian sources ------------------------------------------------------------------------


def _python_doc_documents(root: Path) -> Iterator[Document]:
    source = "python3.11-doc"
    sources = root / "usr/share/doc/python3.11/html/_sources"
    if not sources.is_dir():
        raise CorpusError(f"{source}: no reST sources at {sources}")
    ids = _Ids()
    for path in sorted((sources / "tutorial").glob("*.rst.txt")):
        stem = path.name.removesuffix(".rst.txt")
        for _, title, body in _rst_sections(path.read_text(encoding="utf-8")):
            text = _rst_text(body)
            if title and text:
                doc_id = ids(f"{source}:tutorial/{stem}/{_slug(title)}")
                yield Document(doc_id, "prose", source, f"{_rst_inline(title)}\n\n{text}")
    for path in sorted((sources / "faq").glob("*.rst.txt")):
        stem = path.name.removesuffix(".rst.txt")
        for mark, title, body in _rst_sections(path.read_text(encoding="utf-8")):
            text = _rst_text(body)
            # The FAQs underline each question with "-"; "=" marks groups of questions.
            if mark == "-" and text:
                doc_id = ids(f"{source}:faq/{stem}/{_slug(title)}")
                yield Document(doc_id, "qa", source, f"{_rst_inline(title)}\n\n{text}")
    glossary = (sources / "glossary.rst.txt").read_text(encoding="utf-8")
    for term, definition in _glossary(glossary):
        doc_id = ids(f"{source}:glossary/{_slug(term)}")
        yield Document(doc_id, "definitions", source, f"{term}\n\n{definition}")


def _fortune_documents(root: Path, package: str) -> Iterator[Document]:
    folder = root / "usr/share/games/fortunes"
    if not folder.is_dir():
        raise CorpusError(f"{package}: no fortune files at {folder}")
    for path in sorted(folder.iterdir()):
        # `.dat` files are strfile indexes; `.u8` names are symlinks to the same text.
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        seen: set[str] = set()
        for chunk in re.split(r"^%[ \t]*$", text, flags=re.M):
            fortune = _tidy(chunk)
            # Content-addressed: a fortune keeps its id (and split) when others are added. A
            # file repeats a few fortunes word for word; one copy is enough.
            digest = hashlib.sha256(fortune.encode()).hexdigest()[:12]
            if fortune and digest not in seen:
                seen.add(digest)
                yield Document(f"fortunes:{path.name}/{digest}", "fortunes", package, fortune)


_JARGON_ENTRY = re.compile(r"^   :(.+?):(?:\s+(.*))?$")


def _jargon_documents(root: Path) -> Iterator[Document]:
    """Lexicon entries of the Jargon File: `   :term: pronunciation, part of speech` then an
    indented body. Letter sections (indented 2) list the next terms; they end an entry."""
    source = "jargon-text"
    path = root / "usr/share/doc/jargon-text/jargon.txt.gz"
    if not path.is_file():
        raise CorpusError(f"{source}: {path} is missing")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").replace("\xa0", " ").split("\n")
    try:
        start = lines.index("Glossary")
        end = next(i for i, line in enumerate(lines) if line.strip().startswith("Part III."))
    except (ValueError, StopIteration):
        raise CorpusError(f"{source}: cannot find the lexicon in {path.name}") from None
    ids = _Ids()
    entry: tuple[str, str] | None = None
    body: list[str] = []

    def finish() -> Iterator[Document]:
        if entry is None:
            return
        term, rest = entry
        # "//" is an empty pronunciation; {braces} mark cross-references.
        rest = re.sub(r"^//,?\s*", "", rest)
        paragraphs = [
            p
            for p in "\n".join(body).split("\n\n")
            if not p.strip().startswith("(The next cartoon")
        ]
        text = _tidy(re.sub(r"\{([^{}\n]+)\}", r"\1", rest + "\n\n" + "\n\n".join(paragraphs)))
        if text:
            yield Document(ids(f"jargon:{_slug(term)}"), "definitions", source, f"{term}\n\n{text}")

    for line in lines[start + 1 : end]:
        if match := _JARGON_ENTRY.match(line):
            yield from finish()
            entry, body = (match.group(1).strip(), match.group(2) or ""), []
        elif line.startswith("  ") and not line.startswith("   "):
            yield from finish()
            entry, body = None, []
        elif entry is not None:
            body.append(line[3:] if line.startswith("   ") else line)
    yield from finish()


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(text: str) -> int:
    """dictd's index numbers: base 64, most significant digit first."""
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def _devil_documents(root: Path) -> Iterator[Document]:
    """The Devil's Dictionary in dictd format: an index of (headword, offset, length) into a
    dictzip file (gzip-compatible). Entries read `WORD, n.  Definition...`."""
    source = "dict-devil"
    folder = root / "usr/share/dictd"
    try:
        data = gzip.decompress((folder / "devil.dict.dz").read_bytes())
        index = (folder / "devil.index").read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CorpusError(f"{source}: {exc.filename} is missing") from None
    ids = _Ids()
    seen: set[tuple[int, int]] = set()
    for line in index.splitlines():
        headword, offset, length = line.split("\t")
        span = (_dictd_number(offset), _dictd_number(length))
        # 00database* entries are dictd metadata (and the preface); several headwords can
        # point at one entry.
        if headword.startswith("00") or span in seen:
            continue
        seen.add(span)
        entry = _tidy(data[span[0] : span[0] + span[1]].decode("utf-8"))
        if match := re.match(r"([^,\n]+),\s*(.+)", entry, flags=re.S):
            term, definition = match.group(1).strip(), match.group(2)
        else:
            term, definition = headword, entry
        doc_id = ids(f"devil:{_slug(term)}")
        yield Document(doc_id, "definitions", source, f"{term}\n\n{definition}")


class _HtmlBlocks(HTMLParser):
    """HTML to a list of (kind, text) blocks: "h1".."h6" for titles, "p" for everything else,
    skipping DocBook's navigation bars and tables of contents."""

    _BLOCKS = frozenset(
        {"p", "div", "li", "dt", "dd", "pre", "tr", "table", "blockquote", "ul", "ol", "dl"}
        | {f"h{level}" for level in range(1, 7)}
    )
    _VOID = frozenset({"br", "img", "hr", "meta", "link", "input", "col", "area", "base"})
    _SKIP_CLASSES = frozenset({"navheader", "navfooter", "toc"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []
        self._stack: list[tuple[str, bool]] = []
        self._parts: list[str] = []
        self._prefix = ""

    def _skipping(self) -> bool:
        return bool(self._stack) and self._stack[-1][1]

    def _flush(self) -> None:
        raw = "".join(self._parts)
        self._parts = []
        pre = any(tag == "pre" for tag, _ in self._stack)
        text = raw.strip("\n").rstrip() if pre else " ".join(raw.split())
        if not text:
            return
        heading = next((tag for tag, _ in reversed(self._stack) if re.fullmatch(r"h\d", tag)), "")
        self.blocks.append((heading or "p", self._prefix + text))
        self._prefix = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._VOID:
            if tag == "br" and not self._skipping():
                self._parts.append("\n")
            return
        classes = set((dict(attrs).get("class") or "").split())
        skip = (
            self._skipping()
            or tag in ("head", "script", "style")
            or (tag == "div" and bool(classes & self._SKIP_CLASSES))
        )
        if tag in self._BLOCKS:
            self._flush()
        self._stack.append((tag, skip))
        if tag == "li" and not skip:
            self._prefix = "- "

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._VOID:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag not in {t for t, _ in self._stack}:
            return
        if tag in self._BLOCKS:
            self._flush()
        while self._stack and self._stack.pop()[0] != tag:
            pass
        if tag in ("td", "th") and not self._skipping():
            self._parts.append("  ")

    def handle_data(self, data: str) -> None:
        if not self._skipping():
            self._parts.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def _debian_faq_documents(root: Path) -> Iterator[Document]:
    """The Debian FAQ's HTML: every numbered section title ("1.5. What is ...?") is a question,
    the text up to the next title its answer."""
    source = "debian-faq"
    folder = root / "usr/share/doc/debian/FAQ"
    pages = sorted(p for p in folder.glob("*.en.html") if not p.is_symlink())
    if not pages:
        raise CorpusError(f"{source}: no HTML pages in {folder}")
    for page in pages:
        parser = _HtmlBlocks()
        parser.feed(page.read_text(encoding="utf-8"))
        parser.close()
        question: tuple[str, str] | None = None
        answer: list[str] = []
        for kind, text in [*parser.blocks, ("h1", "")]:
            if kind == "p":
                answer.append(text)
                continue
            if question is not None and answer:
                number, title = question
                body = _tidy("\n\n".join(answer))
                yield Document(f"debian-faq:{number}", "qa", source, f"{title}\n\n{body}")
            numbered = re.fullmatch(r"(\d+(?:\.\d+)+)\.\s+(.+)", text)
            question = (numbered.group(1), numbered.group(2)) if numbered else None
            answer = []


def _extract(source: str, root: Path, package: str) -> Iterator[Document]:
    if source == "python3.11-doc":
        return _python_doc_documents(root)
    if source == "fortunes":
        return _fortune_documents(root, package)
    if source == "jargon-text":
        return _jargon_documents(root)
    if source == "dict-devil":
        return _devil_documents(root)
    if source == "debian-faq":
        return _debian_faq_documents(root)
    raise AssertionError(source)


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
            documents.extend(_python_documents())
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
                documents.extend(_fortune_documents(root, package))
            elif package == _PACKAGES[name][-1]:
                documents.extend(_extract(name, root, package))
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
