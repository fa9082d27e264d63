"""Generated protobuf/gRPC code is current, and the V2 protocol is wire-compatible with tritonclient."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from service import protogen
from service.gen import grpc_predict_v2_pb2 as v2


def _normalized(text: str) -> str:
    # A newer grpcio-tools stamps its own version into otherwise identical code; that is not staleness.
    text = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = 'X'", text)
    text = re.sub(r"# Protobuf Python Version: .*", "# Protobuf Python Version: X", text)
    return re.sub(r"ValidateProtobufRuntimeVersion\([^)]*\)", "ValidateProtobufRuntimeVersion(X)", text, flags=re.S)


def test_committed_generated_code_is_up_to_date(tmp_path):
    fresh = protogen.generate(tmp_path / "gen")
    committed = protogen.GEN_DIR
    fresh_rel = sorted(str(p.relative_to(tmp_path / "gen")) for p in fresh)
    have = sorted(str(p.relative_to(committed)) for p in committed.rglob("*.py*") if "__pycache__" not in p.parts)
    assert fresh_rel == have
    stale = [
        rel
        for rel in fresh_rel
        if _normalized((tmp_path / "gen" / rel).read_text()) != _normalized((committed / rel).read_text())
    ]
    assert not stale, f"run `PYTHONPATH=. python -m service.protogen`; stale: {stale}"


def test_generated_code_ships_with_the_package():
    import tomllib

    cfg = tomllib.loads(Path("pyproject.toml").read_text())
    assert any(p.startswith("service") for p in cfg["tool"]["setuptools"]["packages"]["find"]["include"])
    assert (protogen.GEN_DIR / "__init__.py").is_file() and (
        protogen.GEN_DIR / "hgvae" / "v1" / "__init__.py"
    ).is_file()


DUMP = """
import json
from tritonclient.grpc import service_pb2
out = {}
for name, msg in service_pb2.DESCRIPTOR.message_types_by_name.items():
    def walk(m, prefix):
        out[prefix] = {f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else ""]
                       for f in m.fields}
        for n in m.nested_types:
            walk(n, prefix + "." + n.name)
    walk(msg, name)
svc = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
out["__methods__"] = {m.name: [m.input_type.full_name, m.output_type.full_name] for m in svc.methods}
print(json.dumps(out))
"""


def _fields(m) -> dict:
    return {
        f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else ""] for f in m.fields
    }


def test_v2_messages_match_tritons_on_the_wire():
    # tritonclient's protos live in the same `inference` package: compare in a separate process
    proc = subprocess.run([sys.executable, "-c", DUMP], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    triton = json.loads(proc.stdout)
    ours: dict = {}

    def walk(m, prefix):
        ours[prefix] = _fields(m)
        for n in m.nested_types:
            if not n.GetOptions().map_entry:
                walk(n, prefix + "." + n.name)

    for name, msg in v2.DESCRIPTOR.message_types_by_name.items():
        walk(msg, name)
    for name, fields in ours.items():
        assert name in triton, name
        for field, spec in fields.items():
            theirs = triton[name].get(field)
            if spec[3].endswith("Entry"):  # map entries are named after the field; compare number/label only
                assert theirs and theirs[:3] == spec[:3], (name, field)
            else:
                assert theirs == spec, (name, field, theirs, spec)
    methods = {
        m.name: [m.input_type.full_name, m.output_type.full_name]
        for m in v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    }
    for method, types in methods.items():
        assert triton["__methods__"][method] == types
