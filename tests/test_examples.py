"""examples/ run as a user runs them, so they cannot rot (the MockClock
one, examples/test_my_app.py, is collected by pytest itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("script", "shows"),
    [
        (
            "chat.py",
            [
                "alice reached bob: direct",
                "you said 'hello'",
                "you said 'how are you?'",
            ],
        ),
        ("send_file.py", ["sent 4,194,304 bytes as random.bin", "checked"]),
    ],
)
def test_example_runs(script: str, shows: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for text in shows:
        assert text in result.stdout, result.stdout


def test_send_file_sends_a_given_file(tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("polykey\n" * 1000)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "send_file.py"), str(source)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sent 8,000 bytes as notes.txt" in result.stdout
