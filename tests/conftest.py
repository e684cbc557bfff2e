import os, sys, pathlib
import pytest

# Tiny test models gain nothing from intra-op threads, and on busy cores OpenMP's spinning barriers
# make them up to 100x slower: one thread, set before torch is imported, so every test, CLI run and
# gloo rank (through the fork server, which inherits it) has it.
os.environ["OMP_NUM_THREADS"] = "1"
# pytest -n already keeps every core busy: compiling in-process spares the torch imports of a compile-worker pool
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def speedchat_home(tmp_path, monkeypatch):
    """Every test gets its own empty $SPEEDCHAT_HOME: nothing leaks between tests or into ~/.cache."""
    home = tmp_path / "speedchat_home"
    monkeypatch.setenv("SPEEDCHAT_HOME", str(home))
    return home


def pytest_collection_modifyitems(config, items):
    """Longest first, for `pytest -n N --dist worksteal` (test.sh): xdist hands each worker one
    contiguous slice and an idle worker steals from the tail of the busiest. So the heaviest test
    (the end-to-end run) opens the first slice, filled with the lightest tests for others to steal,
    and the other slices hold the rest heaviest first. Serial runs keep the order as written."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers < 2 or len(items) < 2 * workers:
        return
    cost = lambda item: item.get_closest_marker("heavy").args[0] if item.get_closest_marker("heavy") else 0.5
    ranked = sorted(items, key=cost, reverse=True)  # stable: ties keep their written order
    first = len(items) // workers  # the size of the first worker's slice (worksteal's even split)
    items[:] = [ranked[0]] + ranked[len(ranked) - first + 1:] + ranked[1:len(ranked) - first + 1]
