#!/usr/bin/env bash
# Regenerates the Python stubs for protos/residue/v1 (STYLE.md rule 12): the one command to run after
# editing a .proto. The output is committed; tests/unit/test_protos.py regenerates into a temp folder and
# fails when the committed files differ.
#
#   scripts/gen_protos.sh [OUT_DIR]     default OUT_DIR: service/_proto
#
# protoc writes residue/v1/residue_pb2*.py with `from residue.v1 import residue_pb2`; that top-level
# package does not exist once installed, so the files are flattened into OUT_DIR (the package
# residue_monitor.service._proto) and the import is made relative. The descriptor keeps its canonical
# name "residue/v1/residue.proto", which server reflection reports.
# PYTHON selects the interpreter (default: python3 from PATH, i.e. the activated venv).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-service/_proto}
PY=${PYTHON:-python3}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# grpc_tools.protoc adds its bundled include path, so google/protobuf/*.proto resolve.
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$work" --pyi_out="$work" --grpc_python_out="$work" \
  protos/residue/v1/residue.proto

mkdir -p "$OUT"
for f in residue_pb2.py residue_pb2.pyi residue_pb2_grpc.py; do
  sed -e 's/^from residue\.v1 import /from . import /' "$work/residue/v1/$f" > "$OUT/$f"
done
