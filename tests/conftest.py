"""Suite-wide settings. Tiny models spend their time in per-op overhead, where extra threads only
add contention (measured on the 2-core CI machine: 1 thread is 5-10x faster for these tests)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _expert_loop_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU, packed experts run expert by expert only above `MIN_INTERMEDIATE_BYTES`, which no
    tiny test model reaches: lower it so every test runs the loop (with its custom backward), the
    CPU path of real models. The grouped path is tested where it is forced (tests/test_layers.py)
    and under autocast."""
    from moeify.layers import expert_loop

    monkeypatch.setattr(expert_loop, "MIN_INTERMEDIATE_BYTES", 0)


@pytest.fixture
def fresh_accelerate(monkeypatch: pytest.MonkeyPatch):
    """accelerate keeps process-wide singletons and reads ACCELERATE_* variables: a test that
    builds an Accelerator starts and ends without either."""
    import os

    from accelerate.state import AcceleratorState, GradientState

    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))] + ["WORLD_SIZE"]:
        monkeypatch.delenv(key, raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def hub(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """The loopback Hub (tests/hub_server.py), with huggingface_hub pointed at it as HF_ENDPOINT
    would (HF_ENDPOINT itself is read at import: the subprocess test sets it) and a private
    download cache."""
    from hub_server import TOKEN, HubServer
    from huggingface_hub import constants

    with HubServer(tmp_path / "hub", token=TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # loopback only: nothing leaves the machine
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server
