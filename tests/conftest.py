import importlib
import os
import sys

import pytest
from PIL import Image
from running_server import RunningServer

# Tests never reach the network, and build their own tiny checkpoint in a fresh cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def vlm(tmp_path_factory):
    from llama_vision_helpers import load_model

    os.environ["LLAMA_VISION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return load_model("tiny-random")


@pytest.fixture
def photo():
    """A small RGB image with some structure (a wide one, so the processor uses several tiles)."""
    image = Image.new("RGB", (240, 110), "white")
    for x in range(0, 240, 20):
        image.paste((x, 80, 200 - x // 2), (x, 0, x + 10, 110))
    return image


@pytest.fixture
def fake_unsloth(tmp_path, monkeypatch):
    """An installed-looking `unsloth` whose import raises, as the real one does without a GPU.

    With it on the path, code that imports unsloth fails loudly even where unsloth is not installed.
    Returns the folder to put on PYTHONPATH for a subprocess.
    """
    folder = tmp_path / "fake_site"
    (folder / "unsloth").mkdir(parents=True)
    (folder / "unsloth" / "__init__.py").write_text(
        "raise NotImplementedError('unsloth was imported (this fake stands for it on a machine without a GPU)')\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    importlib.invalidate_caches()
    yield folder
    sys.modules.pop("unsloth", None)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# limits the tests can cross with small bodies, and every picture in input/ stays within
SERVER_LIMITS = ("--max-body-mb", "1", "--max-image-pixels", "1000000")


@pytest.fixture(scope="session")
def server(vlm, tmp_path_factory):
    """One server for the session, serving the same tiny checkpoint as `vlm` (same cache folder)."""
    running = RunningServer(tmp_path_factory.mktemp("server") / "serve.log", *SERVER_LIMITS).wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def engine(vlm):
    """An engine over the tiny model, one-at-a-time scheduler, shared by the tests of a module."""
    from llama_vision_helpers.engine import Engine

    engine = Engine(vlm)
    yield engine
    engine.close()


@pytest.fixture
def gated_engine(vlm):
    """An engine whose scheduler starts only once `engine.gate` is set, so tests can fill its queue first."""
    import threading

    from llama_vision_helpers.engine import Engine, SerialScheduler

    gate = threading.Event()

    class Gated:
        def run(self, engine):
            gate.wait(60)
            SerialScheduler().run(engine)

    engine = Engine(vlm, Gated())
    engine.gate = gate
    yield engine
    gate.set()
    engine.close()
