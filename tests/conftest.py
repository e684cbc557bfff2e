import os, sys, pathlib
import pytest

# Tiny test models run fastest on one thread (and far slower on oversubscribed cores); set before
# torch is imported so subprocesses (gloo ranks, CLI runs) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def speedchat_home(tmp_path, monkeypatch):
    """Every test gets its own empty $SPEEDCHAT_HOME: nothing leaks between tests or into ~/.cache."""
    home = tmp_path / "speedchat_home"
    monkeypatch.setenv("SPEEDCHAT_HOME", str(home))
    return home
