import os, sys, pathlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def speedchat_home(tmp_path, monkeypatch):
    """Every test gets its own empty $SPEEDCHAT_HOME: nothing leaks between tests or into ~/.cache."""
    home = tmp_path / "speedchat_home"
    monkeypatch.setenv("SPEEDCHAT_HOME", str(home))
    return home
