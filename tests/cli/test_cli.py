"""The command line: thin wiring, clear errors, exit codes."""

from __future__ import annotations

import pytest

from elasticfleet.cli import main


def test_unknown_corpus_source_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["corpus", "build", "--sources", "bogus", "--no-progress"]) == 2
    assert "unknown corpus source(s) 'bogus'" in capsys.readouterr().err


def test_bad_layer_list_is_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["model", "generate", "hi", "--drop-attention", "1,x"])
    assert "comma-separated layer indices" in capsys.readouterr().err


@pytest.mark.real_model
def test_generate_streams_text_under_a_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "model",
            "generate",
            "What is the capital of France?",
            "--drop-attention",
            "27",
            "--max-new-tokens",
            "12",
        ]
    )
    out = capsys.readouterr()
    assert code == 0
    assert out.out.strip()
    assert "attention dropped [27]" in out.err
    assert "tokens, finish:" in out.err


@pytest.mark.real_model
def test_out_of_range_plan_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "generate", "hi", "--drop-ffn", "30"]) == 2
    assert "FFN block index 30 is out of range; layers are 0..29" in capsys.readouterr().err
