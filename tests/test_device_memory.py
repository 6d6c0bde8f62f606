"""``runtime.device_memory_gib``: the cap on a run's CUDA memory and the chunk sized to it.

No GPU here: PyTorch's CUDA memory queries are replaced by a fake 80 GiB device, which
checks the numbers saliencycheck hands to the allocator and the rows it derives from them.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from saliencycheck.config import RuntimeConfig, load_config
from saliencycheck.engine import device_memory as memory
from saliencycheck.errors import ConfigError
from tests.test_cli import project  # noqa: F401  (fixture)

GIB = 2**30
CUDA = torch.device("cuda:0")


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> dict:
    """An 80 GiB device with 60 GiB free, 1 GiB held by this process's tensors."""
    calls: dict = {"fraction": []}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device: calls["fraction"].append((fraction, device)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1 * GIB)
    return calls


def test_the_cap_is_handed_to_the_allocator_as_a_share_of_the_device(fake_gpu: dict) -> None:
    assert memory.cap_device_memory(CUDA, 20.0) == 20 * GIB
    assert fake_gpu["fraction"] == [(0.25, CUDA)]


def test_no_cap_and_the_cpu_leave_the_allocator_alone(fake_gpu: dict) -> None:
    assert memory.cap_device_memory(CUDA, None) is None
    assert memory.cap_device_memory(torch.device("cpu"), 20.0) is None
    assert fake_gpu["fraction"] == []


def test_a_cap_above_the_device_is_a_config_error_naming_the_field(fake_gpu: dict) -> None:
    with pytest.raises(ConfigError, match=r"runtime\.device_memory_gib: 100 GiB exceeds the "
                                          r"80\.0 GiB of cuda:0; lower it"):
        memory.cap_device_memory(CUDA, 100.0)
    assert fake_gpu["fraction"] == []


def test_passes_get_what_the_cap_leaves_when_less_than_free_memory(fake_gpu: dict) -> None:
    assert memory.free_for_passes(CUDA) == 60 * GIB
    assert memory.free_for_passes(CUDA, 11 * GIB) == 10 * GIB  # 1 GiB already held
    assert memory.free_for_passes(CUDA, 70 * GIB) == 60 * GIB  # the device's free memory
    assert memory.free_for_passes(CUDA, GIB // 2) == 0
    per_row = 100 * 2**20
    assert memory.rows_for(memory.free_for_passes(CUDA, 11 * GIB), per_row) == 35
    assert memory.rows_for(memory.free_for_passes(CUDA), per_row) == 215


def test_the_cap_is_optional_positive_and_ignored_on_the_cpu(tmp_path: Path) -> None:
    assert RuntimeConfig().device_memory_gib is None
    assert RuntimeConfig(device_memory_gib=12.5).device_memory_gib == 12.5
    config = tmp_path / "c.yaml"
    config.write_text("runtime:\n  device_memory_gib: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*runtime\.device_memory_gib"):
        load_config(config)
    cpu = torch.zeros(1, 2)
    assert memory.auto_chunk_size(nn.Linear(2, 2), cpu, 1) == memory.CPU_CHUNK_ROWS


def test_prepare_caps_the_device_and_sizes_chunks_to_the_cap(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from saliencycheck.runner import prepare, setup

    calls: list = []

    def cap(device: torch.device, gib: float | None) -> int:
        calls.append(("cap", device.type, gib))
        return 3 * GIB

    def chunk(model: nn.Module, example: torch.Tensor, budget: int | None = None) -> int:
        calls.append(("chunk", budget))
        return 5

    monkeypatch.setattr(setup, "cap_device_memory", cap)
    monkeypatch.setattr(setup, "auto_chunk_size", chunk)
    prepared = prepare(load_config(project / "config.yaml", ["runtime.device_memory_gib=3"]))
    assert calls == [("cap", "cpu", 3.0), ("chunk", 3 * GIB)]
    assert prepared.context.chunk_size == 5


def test_fp32_turns_tf32_off_while_computing_and_restores_the_users_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from saliencycheck.engine.fp32 import exact_fp32

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "tf32"  # the user's choice
    try:
        with pytest.raises(RuntimeError, match="inside"), exact_fp32():
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
            raise RuntimeError("inside")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
        with exact_fp32(enabled=False):  # bf16/fp16 runs keep the user's settings
            assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


def test_the_api_puts_the_memory_fraction_back_after_a_capped_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook's later work must not stay capped by one check's device_memory_gib."""
    fractions = {0: 0.7}  # the user's own cap before the run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction",
                        lambda index: fractions[index], raising=False)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, index: fractions.__setitem__(int(index), fraction))
    with pytest.raises(RuntimeError, match="the run failed"), \
            memory.memory_fraction_restored():
        fractions[0] = 0.1  # the run's cap
        raise RuntimeError("the run failed")
    assert fractions == {0: 0.7}
