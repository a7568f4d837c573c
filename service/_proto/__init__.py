"""Generated protobuf and gRPC stubs for protos/residue/v1 (package ``residue.v1``).

Produced by ``scripts/gen_protos.sh`` and committed; never edit them by hand (tests/unit/test_protos.py
fails when they differ from a fresh generation). Excluded from lint and type checking.
"""
