"""The CPU's integer instruction set, and the weight format that keeps ORT's kernels exact on it.

On x86 without VNNI, ONNX Runtime's u8s8 GEMM (uint8 activations times int8 weights) uses
``vpmaddubsw``, which adds two ``u8 x s8`` products into a saturating int16: with 8-bit weights
``2 x 255 x 127 = 64770`` overflows ``32767``, so the deployed model drifts from the simulation.
Two ways stay exact: weights of at most 7 bits (``2 x 255 x 64 = 32640`` fits), or uint8 weights,
for which ORT uses its u8u8 kernel that widens to int16 before multiplying. With VNNI
(``vpdpbusd`` sums in int32), AVX-512 VNNI, AMX or on ARM, int8 weights are exact at any width.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

#: The flags that decide ORT's x86 integer kernels, in the order they are reported.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
#: Largest signed weight width that the saturating u8s8 kernel computes exactly.
SATURATION_FREE_BITS = 7


class WeightFormat(StrEnum):
    """How integer weights are stored in the QDQ graph."""

    #: int8 weights (zero point as encoded): ORT's u8s8/s8s8 kernels.
    INT8 = "int8"
    #: Signed weights shifted by 128 into uint8 with zero point ``z + 128``; the same grid, so
    #: the dequantized values are identical, and ORT runs its non-saturating u8u8 kernel.
    UINT8_SHIFTED = "uint8-shifted"


@dataclass(frozen=True)
class CpuIsa:
    """What the CPU offers for integer GEMMs."""

    machine: str
    model_name: str
    flags: frozenset[str]

    @property
    def x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i386", "i686")

    @property
    def has_vnni(self) -> bool:
        return any(flag in self.flags for flag in _VNNI_FLAGS)

    @property
    def u8s8_saturates(self) -> bool:
        """True where ORT's u8s8 kernel sums two products in a saturating int16."""
        return self.x86 and not self.has_vnni

    def weight_format(self, weight_bits: int, signed: bool) -> WeightFormat:
        """The exact and fastest weight format for ``weight_bits``-bit weights on this CPU."""
        if signed and weight_bits > SATURATION_FREE_BITS and self.u8s8_saturates:
            return WeightFormat.UINT8_SHIFTED
        return WeightFormat.INT8

    def summary(self) -> str:
        present = ", ".join(f"{f} {'yes' if f in self.flags else 'no'}" for f in REPORTED_FLAGS)
        return f"{self.model_name} ({self.machine}; {present})"

    def as_dict(self) -> dict[str, object]:
        return {
            "machine": self.machine,
            "model_name": self.model_name,
            "flags": {flag: flag in self.flags for flag in REPORTED_FLAGS},
            "u8s8_saturates": self.u8s8_saturates,
        }


def detect_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuIsa:
    """The running CPU, read from ``/proc/cpuinfo`` (no flags where that file is missing)."""
    flags: frozenset[str] = frozenset()
    model_name: str | None = None
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "flags" and not flags:
                flags = frozenset(value.split())
            elif key == "model name" and model_name is None:
                model_name = value
    return CpuIsa(platform.machine(), model_name or platform.processor() or "unknown CPU", flags)
