"""Running verl 0.9.1's own workers on CPU, for the tests, through verl's public extension
points only (no edits to verl, no fork):

* a CPU platform registered in verl's ``PlatformRegistry`` and selected with
  ``VERL_PLATFORM=cpu`` (verl ships CUDA, NPU and ROCm platforms only);
* its communication backend is gloo, and the process group is created as ``"gloo"`` before
  verl's worker does it (verl would ask for ``"cpu:gloo,cpu:gloo"``, which torch rejects);
* verl's FSDP engine is registered for the device ``cpu`` in its ``EngineRegistry`` (verl
  registers it for ``cuda`` and ``npu``; FSDP2 runs on CPU parameters, FSDP1 does not).

Import this module before anything calls verl's ``get_platform()``.
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType

import torch

os.environ.setdefault("VERL_PLATFORM", "cpu")

from verl.plugin.platform import PlatformBase, PlatformRegistry  # noqa: E402


class _CpuDeviceModule(ModuleType):
    """What verl calls on ``torch.cuda`` (seeds, memory statistics, caches), for the CPU."""

    def __init__(self):
        super().__init__("verl_cpu_device")
        self.manual_seed = self.manual_seed_all = torch.manual_seed

    @staticmethod
    def mem_get_info(device=None) -> tuple[int, int]:
        import psutil

        memory = psutil.virtual_memory()
        return memory.available, memory.total

    @staticmethod
    def _zero(*args, **kwargs) -> int:
        return 0

    @staticmethod
    def _nothing(*args, **kwargs) -> None:
        return None

    max_memory_allocated = max_memory_reserved = memory_allocated = memory_reserved = _zero
    empty_cache = synchronize = reset_peak_memory_stats = set_device = _nothing

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def get_device_name(device=None) -> str:
        return "CPU"  # verl's flops table: unknown, so MFU reads 0

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """verl's platform interface for a CPU-only process (tests only)."""

    _module = _CpuDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return self._module

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"  # verl uses it as a device: .to(get_device_id())

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    def nvtx_range(self, msg: str):
        return contextlib.nullcontext()

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


def register_fsdp_engine_for_cpu() -> None:
    """verl's own FSDP engine classes, registered for the device ``cpu`` as well."""
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"],
                            device="cpu")(FSDPEngineWithLMHead)


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """The process group verl's worker expects, as gloo (before the worker's own init)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
