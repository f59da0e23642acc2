"""Node telemetry: NVML (faked at the pynvml boundary: this machine has no
GPU), the real pynvml failing to initialise here, psutil, and the measured
memory bandwidth with its cache."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest

from qmesh.daemon import membench
from qmesh.daemon.telemetry import Telemetry, TelemetryReader, pcie_gbps


class FakeNvmlError(Exception):
    pass


class NotSupported(FakeNvmlError):
    pass


def fake_nvml(*, init_error: str | None = None) -> types.SimpleNamespace:
    """The pynvml functions the reader calls, for two GPUs: an RTX 4090 on
    PCIe 4.0 x16 idling at gen 1, and an A100 whose temperature query is
    unsupported. Values are what NVML returns (bytes, mW, MHz, bits)."""
    gpus: list[dict[str, Any]] = [
        {
            "name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-aaaa",
            "memory": (24 * 2**30, 1 * 2**30), "util": (37, 12), "temp": 61,
            "power": 113_500, "limit": 450_000, "gen": (1, 4), "width": (16, 16),
            "bus": 384, "memclk": 10_501,
        },
        {
            "name": b"NVIDIA A100-SXM4-80GB", "uuid": b"GPU-bbbb",
            "memory": (80 * 2**30, 0), "util": (0, 0), "temp": None,
            "power": 61_000, "limit": 400_000, "gen": (4, 4), "width": (16, 16),
            "bus": 5120, "memclk": 1593,
        },
    ]  # fmt: skip
    calls: list[str] = []

    def get(index_or_handle: Any, key: str) -> Any:
        value = gpus[index_or_handle][key]
        if value is None:
            raise NotSupported("Not Supported")
        return value

    def init() -> None:
        calls.append("init")
        if init_error:
            raise FakeNvmlError(init_error)

    return types.SimpleNamespace(
        calls=calls,
        NVMLError=FakeNvmlError,
        NVML_CLOCK_MEM=2,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlSystemGetDriverVersion=lambda: "550.54.15",
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: get(h, "name"),
        nvmlDeviceGetUUID=lambda h: get(h, "uuid"),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(
            total=get(h, "memory")[0],
            used=get(h, "memory")[1],
            free=get(h, "memory")[0] - get(h, "memory")[1],
        ),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(
            gpu=get(h, "util")[0], memory=get(h, "util")[1]
        ),
        nvmlDeviceGetTemperature=lambda h, sensor: get(h, "temp"),
        nvmlDeviceGetPowerUsage=lambda h: get(h, "power"),
        nvmlDeviceGetEnforcedPowerLimit=lambda h: get(h, "limit"),
        nvmlDeviceGetCurrPcieLinkGeneration=lambda h: get(h, "gen")[0],
        nvmlDeviceGetMaxPcieLinkGeneration=lambda h: get(h, "gen")[1],
        nvmlDeviceGetCurrPcieLinkWidth=lambda h: get(h, "width")[0],
        nvmlDeviceGetMaxPcieLinkWidth=lambda h: get(h, "width")[1],
        nvmlDeviceGetMemoryBusWidth=lambda h: get(h, "bus"),
        nvmlDeviceGetMaxClockInfo=lambda h, clock: get(h, "memclk"),
    )


@pytest.mark.parametrize(
    ("generation", "width", "expected"),
    [
        (3, 4, 3.94),
        (3, 16, 15.76),
        (4, 16, 31.504),
        (5, 16, 63.008),
        (1, 1, 0.25),
        (None, 16, None),
    ],
)
def test_pcie_link_bandwidth(generation: int | None, width: int, expected: float | None) -> None:
    assert pcie_gbps(generation, width) == expected


def test_gpus_from_nvml() -> None:
    nvml = fake_nvml()
    reader = TelemetryReader(nvml=nvml, host_bandwidth_gbps=42.0)
    reader.start()
    snapshot = reader.read()
    reader.close()
    assert nvml.calls == ["init", "shutdown"]
    assert snapshot.nvml == "ok" and snapshot.driver_version == "550.54.15"
    assert not snapshot.cpu_only
    rtx, a100 = snapshot.gpus
    assert rtx.name == "NVIDIA GeForce RTX 4090" and rtx.uuid == "GPU-aaaa"
    assert (rtx.vram_total, rtx.vram_used, rtx.vram_free) == (24 * 2**30, 2**30, 23 * 2**30)
    assert (rtx.utilization_pct, rtx.temperature_c, rtx.power_w, rtx.power_limit_w) == (
        37, 61, 113.5, 450.0
    )  # fmt: skip
    # Idle at gen 1 now; the planner uses what the link can do.
    assert rtx.pcie_gbps == 4.0 and rtx.pcie_max_gbps == 31.504
    assert rtx.memory_bandwidth_gbps == 1008.1  # 384-bit × 10501 MHz × 2
    assert a100.name == "NVIDIA A100-SXM4-80GB"  # bytes from old pynvml are decoded
    assert a100.temperature_c is None  # unsupported query: no value, no crash
    assert a100.memory_bandwidth_gbps == 2039.0
    assert snapshot.model_memory_free == 23 * 2**30 + 80 * 2**30
    # The JSON form survives a round trip (what the Gate stores).
    data = json.loads(json.dumps(snapshot.to_json()))
    assert data["gpus"][0]["pcie_max_gbps"] == 31.504
    assert Telemetry.from_json(data) == snapshot


def test_nvml_init_failure_is_cpu_only() -> None:
    reader = TelemetryReader(nvml=fake_nvml(init_error="Driver Not Loaded"))
    reader.start()
    snapshot = reader.read()
    assert snapshot.cpu_only and snapshot.gpus == ()
    assert snapshot.nvml == "nvmlInit failed: Driver Not Loaded"
    assert snapshot.model_memory_free == snapshot.host.ram_available
    reader.close()


def test_real_pynvml_on_this_machine_is_cpu_only() -> None:
    """The real code path: nvidia-ml-py is installed, nvmlInit fails (no driver)."""
    pytest.importorskip("pynvml")
    reader = TelemetryReader(host_bandwidth_gbps=10.0)
    reader.start()
    snapshot = reader.read()
    reader.close()
    if snapshot.gpus:
        pytest.skip("this machine has an NVIDIA GPU: scripts/gpu-check.sh covers it")
    assert snapshot.nvml.startswith("nvmlInit failed: ")
    host = snapshot.host
    assert host.cpus_logical >= 1 and host.ram_total >= host.ram_available > 0
    assert host.memory_bandwidth_gbps == 10.0
    assert len(host.load_avg) == 3


def test_memory_bandwidth_is_measured_once_and_cached(tmp_path: Path) -> None:
    first = membench.cached_bandwidth(tmp_path)
    assert not first.cached
    assert first.gbps > 0.1  # any real machine reads faster than 100 MB/s
    assert first.by_threads[1] > 0 and first.threads in first.by_threads
    assert first.at_threads(1) == first.by_threads[1]
    saved = json.loads((tmp_path / "membench.json").read_text())
    assert saved["gbps"] == round(first.gbps, 3) and "memchr" in saved["method"]
    again = membench.cached_bandwidth(tmp_path)
    assert again.cached and again.gbps == pytest.approx(first.gbps, abs=1e-3)
    # Another machine in the same data directory measures afresh.
    saved["machine"]["host"] = "somewhere-else"
    (tmp_path / "membench.json").write_text(json.dumps(saved))
    assert not membench.cached_bandwidth(tmp_path).cached
    # A damaged cache is measured over, not a crash.
    (tmp_path / "membench.json").write_text("{not json")
    assert not membench.cached_bandwidth(tmp_path).cached
