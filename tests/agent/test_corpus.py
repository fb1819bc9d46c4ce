"""The corpus builder: deterministic splits, no held-out leakage, verified cache, token windows.

Most tests build the Python-only corpus (standard library and pydoc topics: about a second, no
network). One module-scoped build uses the real Debian packages, as CI does (root, apt
reachable); it is skipped only where there is no apt at all. Fake `apt-*` scripts exercise the
error paths without touching the system.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from elasticfleet.agent import corpus
from elasticfleet.agent.corpus import (
    ALL_SOURCES,
    DOMAINS,
    EVAL_FRACTION,
    SEPARATOR,
    SHARED_LINE,
    SPLIT_FILES,
    SPLITS,
    CorpusError,
    Document,
    build_corpus,
    corpus_dir,
    load_split,
    token_windows,
    verify_corpus,
)

PYTHON = ("python",)


def _byte_tokenizer() -> Tokenizer:
    """One token per byte, no merges: the stream of a split is exactly its bytes, so a test can
    say which text a window came from."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _stream_ids(tokenizer: Tokenizer, documents: list[Document]) -> list[int]:
    text = "".join(doc.text + SEPARATOR for doc in documents)
    return tokenizer.encode(text, add_special_tokens=False).ids


def _long_lines(docs: list[Document]) -> set[str]:
    folded = (corpus._fold(line) for d in docs for line in d.text.split("\n"))
    return {line for line in folded if len(line) >= SHARED_LINE}


@pytest.fixture(scope="module")
def python_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    build_corpus(root, sources=PYTHON, progress=False)
    return root


@pytest.fixture(scope="module")
def splits(python_root: Path) -> dict[str, list[Document]]:
    return {split: load_split(split, python_root, sources=PYTHON) for split in SPLITS}


def test_layout_and_manifest(python_root: Path, splits: dict[str, list[Document]]) -> None:
    path = corpus_dir(python_root, PYTHON)
    assert path == python_root / "corpus" / "python"
    assert corpus_dir(python_root) == python_root / "corpus" / "all"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [*SPLIT_FILES.values(), "manifest.json"]
    )
    manifest = verify_corpus(path)
    assert manifest["format_version"] == corpus.FORMAT_VERSION
    assert manifest["sources"] == ["python"]
    assert manifest["inputs"]["python"]["stdlib_modules"] == list(corpus.STDLIB_MODULES)
    for split, docs in splits.items():
        counts = manifest["splits"][split]
        assert counts["documents"] == len(docs)
        assert counts["characters"] == sum(len(d.text) for d in docs)
        for domain, entry in counts["domains"].items():
            assert entry["documents"] == sum(d.domain == domain for d in docs)
        # Python alone gives reference prose and code, in both splits.
        assert set(counts["domains"]) == {"prose", "code"}
    line = json.loads((path / SPLIT_FILES["evaluation"]).read_text().split("\n", 1)[0])
    assert list(line) == ["id", "domain", "source", "text"]
    assert "calibration" in corpus.summary(path) and "code" in corpus.summary(path)


def test_same_inputs_give_identical_files(python_root: Path, tmp_path: Path) -> None:
    again = build_corpus(tmp_path, sources=PYTHON, progress=False)
    assert _files(again) == _files(corpus_dir(python_root, PYTHON))


def test_splits_do_not_overlap(splits: dict[str, list[Document]]) -> None:
    calibration, evaluation = splits["calibration"], splits["evaluation"]
    assert not {d.id for d in calibration} & {d.id for d in evaluation}
    assert not {corpus._fold(d.text) for d in calibration} & {
        corpus._fold(d.text) for d in evaluation
    }

    # Nor does any long line (a docstring copied between methods): such documents go together.
    assert not _long_lines(calibration) & _long_lines(evaluation)
    every = calibration + evaluation
    assert len({d.id for d in every}) == len(every)
    assert all(d.text.strip() and d.domain in DOMAINS for d in every)


def test_held_out_ratio(splits: dict[str, list[Document]]) -> None:
    held, kept = len(splits["evaluation"]), len(splits["calibration"])
    assert held + kept > 1500  # fine-grained documents, so the ratio is stable
    assert abs(held / (held + kept) - EVAL_FRACTION) < 0.04  # 8.5% on Python 3.11.7


def test_documents_are_sensible_units(splits: dict[str, list[Document]]) -> None:
    docs = {d.id: d for split in splits.values() for d in split}
    # A function is its own document, decorators and all; a module's rest keeps its docstring.
    assert docs["stdlib:textwrap.dedent"].text.startswith("def dedent(text):")
    assert '"""Text wrapping and filling.' in docs["stdlib:textwrap"].text
    assert "def dedent" not in docs["stdlib:textwrap"].text
    # Long classes are split into methods; short ones stay whole.
    assert "stdlib:argparse.ArgumentParser.parse_args" in docs
    assert docs["stdlib:reprlib.Repr"].text.startswith("class Repr:")
    assert any(i.startswith("pydoc:specialnames/") for i in docs)
    doc = Document("x", "qa", "s", "What is it?\n\nAn answer.\n\nMore.")
    assert (doc.head, doc.body) == ("What is it?", "An answer.\n\nMore.")


def test_rebuild_of_a_valid_corpus_is_a_no_op(tmp_path: Path) -> None:
    path = build_corpus(tmp_path, sources=PYTHON, progress=False)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [path, *path.iterdir()]}
    assert build_corpus(tmp_path, sources=("python",), progress=False) == path
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [path, *path.iterdir()]}
    assert after == before


def test_corruption_is_detected_and_force_repairs(tmp_path: Path) -> None:
    path = build_corpus(tmp_path, sources=PYTHON, progress=False)
    good = _files(path)
    target = path / SPLIT_FILES["evaluation"]
    data = bytearray(target.read_bytes())
    data[100] ^= 0x01  # same size, different content
    target.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=r"evaluation\.jsonl: sha256.*--force"):
        load_split("evaluation", tmp_path, sources=PYTHON)
    with pytest.raises(CorpusError, match="--force"):
        build_corpus(tmp_path, sources=PYTHON, progress=False)
    target.write_bytes(bytes(data[:-10]))
    with pytest.raises(CorpusError, match="bytes, the manifest says"):
        verify_corpus(path)
    assert build_corpus(tmp_path, sources=PYTHON, force=True, progress=False) == path
    assert _files(path) == good
    (path / "manifest.json").unlink()
    with pytest.raises(CorpusError, match=r"manifest\.json: missing"):
        load_split("calibration", tmp_path, sources=PYTHON)


def test_interrupted_build_leaves_nothing_that_looks_valid(tmp_path: Path) -> None:
    stale = tmp_path / "corpus" / ".python.new-abc.tmp"
    stale.mkdir(parents=True)
    (stale / "calibration.jsonl").write_text("{}\n")
    path = build_corpus(tmp_path, sources=PYTHON, progress=False)
    assert not stale.exists()
    assert sorted(p.name for p in path.parent.iterdir() if p.is_dir()) == ["python"]


def test_token_windows_come_from_their_split(
    python_root: Path, splits: dict[str, list[Document]]
) -> None:
    tokenizer = _byte_tokenizer()
    windows = token_windows("evaluation", tokenizer, 64, 40, cache_root=python_root, sources=PYTHON)
    assert windows.shape == (40, 64) and windows.dtype == torch.long and windows.is_contiguous()
    # Exactly the start of the evaluation documents, in stored order, each followed by the
    # separator: nothing from calibration.
    expected = _stream_ids(tokenizer, splits["evaluation"])
    assert windows.flatten().tolist() == expected[: 40 * 64]
    again = token_windows("evaluation", tokenizer, 64, 40, cache_root=python_root, sources=PYTHON)
    assert torch.equal(windows, again)
    # count=None: every full window, the partial tail dropped.
    every = token_windows(
        "evaluation", tokenizer, 512, None, cache_root=python_root, sources=PYTHON
    )
    assert every.shape == (len(expected) // 512, 512)
    assert every.flatten().tolist() == expected[: every.numel()]
    code = token_windows(
        "evaluation", tokenizer, 64, 10, cache_root=python_root, domains=["code"], sources=PYTHON
    )
    code_docs = [d for d in splits["evaluation"] if d.domain == "code"]
    assert code.flatten().tolist() == _stream_ids(tokenizer, code_docs)[:640]
    calibration = token_windows(
        "calibration", tokenizer, 64, 40, cache_root=python_root, sources=PYTHON
    )
    assert calibration.flatten().tolist() == _stream_ids(tokenizer, splits["calibration"])[:2560]
    assert token_windows(
        "evaluation", tokenizer, 8, 0, cache_root=python_root, sources=PYTHON
    ).shape == (0, 8)


def test_stored_order_mixes_domains(splits: dict[str, list[Document]]) -> None:
    # The first windows an evaluator takes must not all be one domain.
    first = splits["calibration"][:50]
    assert {d.domain for d in first} == {"prose", "code"}


def test_clear_errors(python_root: Path, tmp_path: Path) -> None:
    tokenizer = _byte_tokenizer()
    with pytest.raises(ValueError, match="unknown split 'train'"):
        load_split("train", python_root, sources=PYTHON)
    with pytest.raises(ValueError, match="unknown split"):
        token_windows("test", tokenizer, 8, 1, cache_root=python_root, sources=PYTHON)
    with pytest.raises(ValueError, match=r"unknown corpus source.*'wikipedia'"):
        build_corpus(tmp_path, sources=("python", "wikipedia"), progress=False)
    with pytest.raises(ValueError, match="no corpus sources"):
        corpus_dir(tmp_path, ())
    with pytest.raises(ValueError, match=r"unknown domain.*'poetry'"):
        token_windows(
            "evaluation",
            tokenizer,
            8,
            1,
            cache_root=python_root,
            domains=["poetry"],
            sources=PYTHON,
        )
    with pytest.raises(ValueError, match="window"):
        token_windows("evaluation", tokenizer, 0, 1, cache_root=python_root, sources=PYTHON)
    with pytest.raises(CorpusError, match="windows of 4096 tokens, 100000 were asked for"):
        token_windows(
            "evaluation", tokenizer, 4096, 100_000, cache_root=python_root, sources=PYTHON
        )
    with pytest.raises(CorpusError, match=r"no corpus at .*elasticfleet corpus build"):
        load_split("evaluation", tmp_path)


def _fake_tools(folder: Path, log: Path, tools: dict[str, str]) -> None:
    folder.mkdir()
    for name, body in tools.items():
        script = folder / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n{body}\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("root_user", [False, True], ids=["user", "root"])
def test_missing_debian_package_fails_clearly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    root_user: bool,
) -> None:
    # apt whose lists do not know the package, before and after an update.
    log = tmp_path / "calls.log"
    _fake_tools(
        tmp_path / "bin",
        log,
        {"apt-cache": "exit 0", "apt-get": "exit 0", "dpkg-deb": "exit 1"},
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(os, "geteuid", lambda: 0 if root_user else 1000)
    expected = "dict-devil cannot be had" + ("" if root_user else r".*sudo apt-get update")
    with pytest.raises(CorpusError, match=f"{expected}.*--sources python"):
        build_corpus(tmp_path / "cache", sources=("dict-devil",), progress=False)
    updates = [line for line in log.read_text().splitlines() if line == "apt-get update"]
    assert len(updates) == (1 if root_user else 0)  # at most once, and only as root
    assert ("running `apt-get update` (as root)" in capsys.readouterr().err) == root_user
    assert not corpus_dir(tmp_path / "cache", ("dict-devil",)).exists()


def test_no_apt_at_all_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, apt-cache or dpkg-deb
    with pytest.raises(CorpusError, match=r"need apt-get, apt-cache, dpkg-deb.*--sources python"):
        build_corpus(tmp_path / "cache", progress=False)


# --- the real corpus, Debian packages included ------------------------------------------------


@pytest.fixture(scope="module")
def full_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("the Debian sources need apt-get and dpkg-deb (CI has them)")
    root = tmp_path_factory.mktemp("full")
    build_corpus(root, progress=False)
    return root


def test_full_corpus_from_debian_packages(full_root: Path) -> None:
    path = corpus_dir(full_root)
    manifest = verify_corpus(path)
    assert manifest["sources"] == list(ALL_SOURCES)
    packages = {
        name: entry["version"]
        for source in ALL_SOURCES[1:]
        for name, entry in manifest["inputs"][source]["packages"].items()
    }
    assert set(packages) == {*ALL_SOURCES[1:], "fortunes-min"}
    # Every domain is on both sides of the split, from every source.
    for split in SPLITS:
        assert set(manifest["splits"][split]["domains"]) == set(DOMAINS)
    calibration, evaluation = (
        load_split("calibration", full_root),
        load_split("evaluation", full_root),
    )
    assert not _long_lines(calibration) & _long_lines(evaluation)
    docs = calibration + evaluation
    by_source: dict[str, list[Document]] = {}
    for doc in docs:
        by_source.setdefault(doc.source, []).append(doc)
    assert set(by_source) == {
        "pydoc_data", "stdlib", "python3.11-doc", "fortunes", "fortunes-min",
        "jargon-text", "dict-devil", "debian-faq",
    }  # fmt: skip
    assert len(by_source["fortunes"]) + len(by_source["fortunes-min"]) > 10_000
    assert len(by_source["jargon-text"]) > 2000 and len(by_source["dict-devil"]) > 900
    assert len({d.id.split("/")[0] for d in by_source["fortunes"]}) >= 40  # genre files
    # Question/answer and definition documents: a question or term line, then the answer.
    qa = [d for d in docs if d.domain == "qa"]
    assert len(qa) > 250 and sum(d.head.endswith("?") for d in qa) > 0.85 * len(qa)
    definitions = [d for d in docs if d.domain == "definitions"]
    assert all(len(d.head) < 100 and d.body for d in definitions)
    # Markup is rendered, not left in.
    python_doc = " ".join(d.text for d in by_source["python3.11-doc"])
    for markup in (":func:`", ":ref:`", ".. index::", ">`_"):
        assert markup not in python_doc
    assert "<p>" not in " ".join(d.text for d in by_source["debian-faq"])
    held = manifest["splits"]["evaluation"]["documents"]
    assert abs(held / len(docs) - EVAL_FRACTION) < 0.02


@pytest.mark.real_model
def test_real_tokenizer_windows(full_root: Path, real_model_dir: Path) -> None:
    from elasticfleet.worker.model.generation import load_tokenizer

    tokenizer = load_tokenizer(real_model_dir)
    windows = token_windows("evaluation", tokenizer, 256, 64, cache_root=full_root)
    assert windows.shape == (64, 256)
    assert int(windows.min()) >= 0 and int(windows.max()) < tokenizer.get_vocab_size()
    assert torch.equal(
        windows, token_windows("evaluation", tokenizer, 256, 64, cache_root=full_root)
    )
    text = "".join(d.text + SEPARATOR for d in load_split("evaluation", full_root))
    decoded = tokenizer.decode(windows.flatten().tolist(), skip_special_tokens=False)
    assert text.startswith(decoded.rstrip("\ufffd"))  # a window may end inside a character
