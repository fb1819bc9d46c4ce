"""Text extraction for the corpus: one function per offline source, each turning what that
source ships (reST, Python modules, fortune files, dictd and HTML dictionaries) into
`Document`s with stable ids and a domain label.

`elasticfleet.agent.corpus` fetches the inputs, deduplicates, splits and writes the corpus;
this module only reads files that are already on disk, so each extractor can be read and
tested on its own. The rendering here defines the corpus text: changing it changes every
split's checksum (bump `corpus.FORMAT_VERSION`).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import re
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

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


def python_documents() -> Iterator[Document]:
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


def fortune_documents(root: Path, package: str) -> Iterator[Document]:
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


def debian_documents(source: str, root: Path, package: str) -> Iterator[Document]:
    """The documents of Debian source `source` (not fortunes: `fortune_documents`), from
    its last package unpacked at `root`."""
    if source == "python3.11-doc":
        return _python_doc_documents(root)
    if source == "fortunes":
        return fortune_documents(root, package)
    if source == "jargon-text":
        return _jargon_documents(root)
    if source == "dict-devil":
        return _devil_documents(root)
    if source == "debian-faq":
        return _debian_faq_documents(root)
    raise AssertionError(source)
