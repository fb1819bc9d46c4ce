"""The checked-in gRPC stubs must be exactly what scripts/gen-proto makes
from the .proto (CI's sync check), and the .proto must follow the API rules."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "elasticfleet" / "v1" / "worker.proto"
STUBS = ROOT / "worker" / "serving" / "proto_gen"


def test_checked_in_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "gen-proto"), str(tmp_path)], check=True)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(p.name for p in STUBS.iterdir() if p.is_file())
    for name in generated:
        assert (tmp_path / name).read_text() == (STUBS / name).read_text(), (
            f"worker/serving/proto_gen/{name} is out of date: run bash scripts/gen-proto"
        )


def test_every_rpc_message_and_field_has_a_comment() -> None:
    lines = PROTO.read_text().splitlines()
    declaration = re.compile(
        r"^\s*(rpc |message |enum |oneof |(optional |repeated )?[\w.]+ \w+ = \d+;|[A-Z_]+ = \d+;)"
    )
    for number, line in enumerate(lines):
        if declaration.match(line):
            assert lines[number - 1].strip().startswith("//"), (
                f"worker.proto line {number + 1} has no comment: {line.strip()}"
            )


def test_enum_zero_values_are_unspecified() -> None:
    for match in re.finditer(r"enum (\w+) \{[^}]*?(\w+) = 0;", PROTO.read_text()):
        assert match.group(2).endswith("_UNSPECIFIED"), match.group(0)
