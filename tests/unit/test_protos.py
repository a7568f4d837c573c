"""The wire contract's hygiene (STYLE.md rule 12): committed stubs are current, every declaration in
protos/residue/v1/residue.proto is commented, and every enum starts with ``<ENUM>_UNSPECIFIED = 0``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from residue_monitor.service._proto import residue_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "protos" / "residue" / "v1" / "residue.proto"
STUBS = ("residue_pb2.py", "residue_pb2.pyi", "residue_pb2_grpc.py")

_BLOCK = re.compile(r"^(message|enum|service|oneof)\s+(\w+)\s*\{")
_FIELD = re.compile(r"^(?:(?:repeated|optional)\s+)?(?:map<[^>]+>|[A-Za-z_][\w.]*)\s+(\w+)\s*=\s*\d+\s*;")
_ENUM_VALUE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(\d+)\s*;")
_RPC = re.compile(r"^rpc\s+(\w+)\s*\(")


@dataclass
class Outline:
    """What the parser found in a .proto text."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    """Message name → field names in order (oneof members included)."""
    enums: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    """Enum name → (value name, number) in order."""
    uncommented: list[str] = field(default_factory=list)
    """``line N: text`` for each declaration without a comment above it or at its end."""


def outline(text: str) -> Outline:
    """Parse the subset of proto3 this repository uses (one declaration per line)."""
    out = Outline()
    stack: list[tuple[str, str]] = []  # (kind, name) of the open blocks
    prev = ""  # previous non-blank line, stripped
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        code = line.split("//", 1)[0].strip()
        commented = prev.startswith("//") or "//" in line
        decl = None
        if m := _BLOCK.match(code):
            decl = m.group(0)
            stack.append((m.group(1), m.group(2)))
            if m.group(1) == "message":
                out.fields[m.group(2)] = []
            elif m.group(1) == "enum":
                out.enums[m.group(2)] = []
        elif code.startswith("}"):
            stack.pop()
        elif stack and stack[-1][0] == "enum" and (m := _ENUM_VALUE.match(code)):
            decl = code
            out.enums[stack[-1][1]].append((m.group(1), int(m.group(2))))
        elif stack and stack[-1][0] in ("message", "oneof") and (m := _FIELD.match(code)):
            decl = code
            message = next(name for kind, name in reversed(stack) if kind == "message")
            out.fields[message].append(m.group(1))
        elif stack and stack[-1][0] == "service" and _RPC.match(code):
            decl = code
        if decl is not None and not commented:
            out.uncommented.append(f"line {n}: {line}")
        prev = line
    assert not stack, f"unbalanced braces: {stack} still open"
    return out


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    """scripts/gen_protos.sh into a temp dir reproduces service/_proto byte for byte (stale stubs fail)."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) is needed to regenerate the stubs")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, env=env)
    stale = [
        f for f in STUBS if (tmp_path / f).read_bytes() != (ROOT / "service" / "_proto" / f).read_bytes()
    ]
    assert not stale, (
        f"{stale} differ from a fresh generation: run scripts/gen_protos.sh and commit the result"
    )


def test_every_declaration_is_commented() -> None:
    """Each message, enum, enum value, field, oneof, service and rpc has a comment."""
    assert outline(PROTO.read_text()).uncommented == []


def test_parser_sees_every_field_the_compiler_sees() -> None:
    """The text parser finds exactly the descriptor's messages, fields and enum values, so the comment
    check above cannot pass by skipping declarations it failed to recognise."""
    parsed = outline(PROTO.read_text())
    assert parsed.fields == {
        name: [f.name for f in m.fields] for name, m in pb.DESCRIPTOR.message_types_by_name.items()
    }
    assert parsed.enums == {
        name: [(v.name, v.number) for v in e.values] for name, e in pb.DESCRIPTOR.enum_types_by_name.items()
    }


def test_enums_start_with_unspecified_zero() -> None:
    """Every enum's first value is <ENUM_NAME>_UNSPECIFIED = 0 and every value carries the enum prefix."""
    enums = outline(PROTO.read_text()).enums
    assert enums, "no enums parsed"
    for name, values in enums.items():
        prefix = _upper_snake(name)
        assert values[0] == (f"{prefix}_UNSPECIFIED", 0), (
            f"enum {name} must start with {prefix}_UNSPECIFIED = 0"
        )
        assert all(v.startswith(prefix + "_") for v, _ in values), (
            f"enum {name}: values need the {prefix}_ prefix"
        )


def test_checker_catches_violations() -> None:
    """The parser flags an uncommented field and a wrong zero value (so the tests above can fail)."""
    bad = outline(
        "// ok\nmessage M {\n  // id\n  string id = 1;\n  repeated int32 xs = 2;\n"
        "  map<string, double> s = 3; // s\n}\n"
        "// e\nenum Color {\n  // r\n  RED = 0;\n}\n"
    )
    assert bad.uncommented == ["line 5: repeated int32 xs = 2;"]
    assert bad.fields == {"M": ["id", "xs", "s"]}
    assert bad.enums["Color"][0] != ("COLOR_UNSPECIFIED", 0)


def test_service_shape() -> None:
    """ResidueService has the six RPCs of DESIGN.md §5 with the right streaming directions."""
    methods = {m.name: m for m in pb.DESCRIPTOR.services_by_name["ResidueService"].methods}
    assert sorted(methods) == sorted(
        ["Ingest", "GetResidue", "QueryResidues", "WatchFlags", "ListFingerprints", "Trace"]
    )
    assert methods["Ingest"].client_streaming and not methods["Ingest"].server_streaming
    assert methods["WatchFlags"].server_streaming and not methods["WatchFlags"].client_streaming
    assert pb.DESCRIPTOR.name == "residue/v1/residue.proto"  # canonical name, as reflection reports it
    assert pb.DESCRIPTOR.package == "residue.v1"
