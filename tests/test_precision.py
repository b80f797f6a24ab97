"""``medgemma_deploy.precision``: the dtype each precision loads, and whether bfloat16 pays on this CPU."""

from __future__ import annotations

import pytest

from medgemma_deploy.precision import cpu_has_native_bf16, torch_dtype_name


def test_auto_is_bfloat16_on_cuda_and_float32_elsewhere():
    assert torch_dtype_name("auto", "cuda") == "bfloat16"
    assert torch_dtype_name("auto", "cpu") == "float32"
    assert torch_dtype_name("bf16", "cpu") == "bfloat16"
    assert torch_dtype_name("int4", "cpu") is None
    with pytest.raises(ValueError, match="precision must be one of"):
        torch_dtype_name("fp16", "cpu")


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8", True),
        ("fpu sse avx2 amx_bf16", True),
        ("fpu sse avx2 fma f16c sha_ni", False),  # an AMD EPYC without AVX-512
    ],
    ids=["xeon-amx", "amx-only", "avx2"],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_has_native_bf16(cpuinfo) is native


def test_native_bf16_is_false_where_the_cpu_cannot_be_read(tmp_path):
    assert cpu_has_native_bf16(tmp_path / "missing") is False
