"""The generated code in subnet/wire/v1 matches protos/ (run `make protos` after editing a .proto)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh():
    result = subprocess.run([sys.executable, "-m", "subnet.dev.protogen", "--check"], cwd=ROOT, check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"subnet/wire/v1 is stale: {result.stderr.strip()}"


def test_freshness_ignores_the_generators_version_stamps_only(tmp_path):
    """A newer grpcio-tools on a fresh machine restamps the code; an edited message is still stale."""
    from subnet.dev.protogen import OUT_PACKAGE, _without_version_stamps

    original = (OUT_PACKAGE / "expert_pb2.py").read_text()
    restamped = tmp_path / "restamped.py"
    restamped.write_text(original.replace("# Protobuf Python Version: ", "# Protobuf Python Version: 99.")
                         .replace("_runtime_version.Domain.PUBLIC,\n    ", "_runtime_version.Domain.PUBLIC,\n    9"))
    assert restamped.read_text() != original
    assert _without_version_stamps(restamped) == _without_version_stamps(OUT_PACKAGE / "expert_pb2.py")
    grpc_code = (OUT_PACKAGE / "expert_pb2_grpc.py").read_text()
    (tmp_path / "grpc.py").write_text(grpc_code.replace("GRPC_GENERATED_VERSION = '", "GRPC_GENERATED_VERSION = '9"))
    assert _without_version_stamps(tmp_path / "grpc.py") == _without_version_stamps(OUT_PACKAGE / "expert_pb2_grpc.py")
    edited = tmp_path / "edited.py"
    edited.write_text(original.replace("ForwardRequest", "ForwardRequestX", 1))
    assert _without_version_stamps(edited) != _without_version_stamps(OUT_PACKAGE / "expert_pb2.py")
