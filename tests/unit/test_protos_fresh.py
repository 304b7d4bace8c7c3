"""The generated code in subnet/wire/v1 matches protos/ (run `make protos` after editing a .proto)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh():
    result = subprocess.run([sys.executable, "-m", "subnet.dev.protogen", "--check"], cwd=ROOT, check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"subnet/wire/v1 is stale: {result.stderr.strip()}"
