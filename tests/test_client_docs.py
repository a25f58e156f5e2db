"""docs/client.md's code builds: the WebSocketSharp loop compiles with Debian's Mono."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.timing import MS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "client.md"
STUB = ROOT / "tests" / "support" / "WebSocketSharpStub.cs"


def _newtonsoft() -> Path | None:
    found = sorted(Path("/usr/lib/cli").glob("Newtonsoft.Json*/Newtonsoft.Json.dll"))
    return found[-1] if found else None


def test_websocketsharp_example_compiles(tmp_path: Path) -> None:
    """The C# under "Keeping WebSocketSharp" compiles (C# 7.2, warnings as errors)."""
    newtonsoft = _newtonsoft()
    if shutil.which("mcs") is None or newtonsoft is None:
        pytest.fail("needs mono-mcs and libnewtonsoft-json-cil-dev (.ci/run installs them)")
    section = DOC.read_text().split("## Keeping WebSocketSharp", 1)[1]
    blocks = re.findall(r"```csharp\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    example = tmp_path / "Example.cs"
    example.write_text(blocks[0])
    result = subprocess.run(
        [
            "mcs",
            "-target:library",
            "-langversion:7.2",
            "-warn:4",
            "-warnaserror",
            f"-out:{tmp_path / 'Example.dll'}",
            "-r:System.dll",
            "-r:System.Core.dll",
            f"-r:{newtonsoft}",
            str(example),
            str(STUB),
        ],
        capture_output=True,
        text=True,
        timeout=120_000 * MS,
    )
    assert result.returncode == 0, result.stdout + result.stderr
