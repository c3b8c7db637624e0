"""CPU flags and the weight format that keeps ORT's integer kernels exact on them."""

from pathlib import Path

import pytest

from qpp.export.isa import CpuIsa, WeightFormat, detect_isa

AVX2 = frozenset({"sse4_2", "avx2", "fma"})


def test_detect_isa_reads_flags_and_model_name(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx2 avx512_vnni\n\n"
        "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx2 avx512_vnni\n"
    )
    isa = detect_isa(cpuinfo)
    assert isa.model_name == "Test CPU 9000"
    assert {"avx2", "avx512_vnni"} <= isa.flags
    assert isa.has_vnni


def test_missing_cpuinfo_gives_no_flags(tmp_path: Path) -> None:
    assert detect_isa(tmp_path / "absent").flags == frozenset()


@pytest.mark.parametrize(
    ("machine", "flags", "bits", "signed", "expected"),
    [
        # AVX2 without VNNI: 8-bit signed weights would saturate u8s8's int16 pair sums.
        ("x86_64", AVX2, 8, True, WeightFormat.UINT8_SHIFTED),
        ("x86_64", AVX2, 7, True, WeightFormat.INT8),
        ("x86_64", AVX2, 4, True, WeightFormat.INT8),
        ("x86_64", AVX2, 8, False, WeightFormat.INT8),
        ("x86_64", AVX2 | {"avx_vnni"}, 8, True, WeightFormat.INT8),
        ("x86_64", AVX2 | {"avx512_vnni"}, 8, True, WeightFormat.INT8),
        ("aarch64", frozenset({"asimd", "asimddp"}), 8, True, WeightFormat.INT8),
    ],
)
def test_weight_format_follows_the_isa(
    machine: str, flags: frozenset[str], bits: int, signed: bool, expected: WeightFormat
) -> None:
    assert CpuIsa(machine, "cpu", flags).weight_format(bits, signed) is expected


def test_saturation_bound_of_the_u8s8_kernel() -> None:
    """vpmaddubsw adds two u8 x s8 products into int16: 7-bit weights fit, 8-bit do not."""
    int16_max = 2**15 - 1
    assert 2 * 255 * 64 <= int16_max < 2 * 255 * 128
