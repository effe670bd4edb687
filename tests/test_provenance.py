"""provenance.json records the machine: processor, PyTorch's CPU capability, math libraries, thread counts."""
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

from ood_lib import results
from ood_lib.config import load_profile

# torch.__config__.show() of two builds: the x86-64 wheel of the study machines (MKL, oneDNN), and an aarch64
# build with OpenBLAS (abridged)
SHOW_MKL = """PyTorch built with:
  - GCC 13.3
  - Intel(R) oneAPI Math Kernel Library Version 2024.2-Product Build 20240605 for Intel(R) 64 architecture applications
  - Intel(R) MKL-DNN v3.12.0 (Git Hash 80afa71049cd69a3df32adcccb623b12cd7baa22)
  - OpenMP 201511 (a.k.a. OpenMP 4.5)
  - LAPACK is enabled (usually provided by MKL)
  - CPU capability usage: AVX512
  - Build settings: BLAS_INFO=mkl, BUILD_TYPE=Release, LAPACK_INFO=mkl, TORCH_VERSION=2.14.1, USE_MKL=ON,
"""
SHOW_OPENBLAS = """PyTorch built with:
  - GCC 11.2
  - OpenMP 201511 (a.k.a. OpenMP 4.5)
  - LAPACK is enabled (usually provided by MKL)
  - CPU capability usage: SVE256
  - Build settings: BLAS_INFO=open, BUILD_TYPE=Release, LAPACK_INFO=open, TORCH_VERSION=2.5.0, USE_MKL=OFF,
"""


def test_parse_torch_config_mkl_build():
    c = results.parse_torch_config(SHOW_MKL)
    assert (c["blas"], c["lapack"], c["mkl_version"], c["onednn_version"]) == ("mkl", "mkl", "2024.2", "3.12.0")
    assert c["openblas_version"] is None and c["openmp"] == "201511" and c["compiled_cpu_capability"] == "AVX512"
    assert c["math_library"] == "BLAS mkl (MKL 2024.2), oneDNN 3.12.0"


def test_parse_torch_config_openblas_build_and_nothing():
    c = results.parse_torch_config(SHOW_OPENBLAS)
    assert (c["blas"], c["mkl_version"], c["onednn_version"]) == ("open", None, None)
    assert c["math_library"] == "BLAS open" and c["compiled_cpu_capability"] == "SVE256"
    empty = results.parse_torch_config("")
    assert empty["math_library"] == "BLAS unknown" and all(v is None for k, v in empty.items() if k != "math_library")


def test_cpu_model_from_cpuinfo():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\nmodel name\t: AMD EPYC 9654 96-Core Processor\n"
    assert results.cpu_model(x86 * 2) == "AMD EPYC 9654 96-Core Processor"
    assert results.cpu_model("processor\t: 0\ncpu\t\t: POWER9 (raw), altivec supported\n").startswith("POWER9")
    # no model in the text (aarch64 lists only implementer/part numbers): platform.processor(), else the machine
    assert results.cpu_model("processor\t: 0\nCPU implementer\t: 0x41\n") == (
        platform.processor() or platform.machine() or "unknown")


def test_cpu_bf16_units_from_cpuinfo():
    """The two Xeons of the study machines (both "AVX512" to PyTorch) and the AMD EPYC without bf16."""
    amx = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    assert results.cpu_bf16_units(amx * 2) == ["avx512_bf16", "amx_bf16"]
    assert results.cpu_bf16_units("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n") == ["avx512_bf16"]
    assert results.cpu_bf16_units("flags\t\t: fpu avx2 fma\n") == []
    assert results.cpu_bf16_units("processor\t: 0\nCPU implementer\t: 0x41\n") == []  # aarch64: no flags line


def test_machine_info_here():
    m = results.machine_info()
    assert m["cpu_capability"] in results.CPU_CAPABILITIES, m["cpu_capability"]
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["torch_threads"] == torch.get_num_threads() >= 1
    assert 1 <= m["usable_cpus"] <= m["logical_cpus"]
    assert m["processor"].strip() and m["machine"] == platform.machine()
    if sys.platform.startswith("linux") and Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        if names:
            assert m["processor"] == names[0]
    assert isinstance(m["mkl_available"], bool) and isinstance(m["mkldnn_available"], bool)
    if platform.machine() == "x86_64" and Path("/proc/cpuinfo").exists():  # native bf16 against the CPU's own flags
        flags = set(next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("flags")), []))
        if flags & {"avx512_bf16", "amx_bf16"}:
            assert m["native_bf16"] is True
        if not any(f.startswith("avx512") or f.startswith("amx") for f in flags):
            assert m["native_bf16"] is False
    assert set(m["cpu_bf16_units"]) <= set(results.BF16_UNITS), m["cpu_bf16_units"]
    units = " bf16+AMX" if "amx_bf16" in m["cpu_bf16_units"] else " bf16"
    name = results.device_name("cpu")
    assert name.startswith(f"cpu ({m['processor']}, {m['cpu_capability']}") and name.endswith(
        f"{units * m['native_bf16']}, {torch.get_num_threads()} threads)"), name
    assert m["mkl_available"] == torch.backends.mkl.is_available()
    assert m["blas"] and m["math_library"].startswith(f"BLAS {m['blas']}")
    if m["mkl_available"]:
        assert m["mkl_version"] and m["mkl_version"][0].isdigit()
    if m["mkldnn_available"]:
        assert m["onednn_version"] and m["onednn_version"][0].isdigit()
    assert isinstance(m["env"], dict)


def test_machine_info_in_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("OOD_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    results.write_provenance(load_profile("smoke"), "01", "cpu", {"mnist/test": "abc"})
    doc = json.loads((tmp_path / "smoke" / "provenance.json").read_text())["01"]
    m = doc["machine"]
    for key in ("processor", "cpu_capability", "math_library", "blas", "mkl_available", "mkldnn_available",
                "torch_threads", "logical_cpus"):
        assert key in m, key
    assert m["torch_threads"] == torch.get_num_threads() and m["env"] == {"OMP_NUM_THREADS": "2"}
    assert m["cpu_capability"] in results.CPU_CAPABILITIES


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_cpu_capability_follows_aten_cpu_capability(capability):
    """ATEN_CPU_CAPABILITY lowers the instruction set at start-up; the record shows what was really used."""
    import subprocess

    code = "import json; from ood_lib import results; print(json.dumps(results.machine_info()))"
    env = {**__import__("os").environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    here = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    if here not in order:
        pytest.skip(f"not an x86-64 machine ({here})")
    expected = order[min(order.index(capability), order.index(here))]
    assert m["cpu_capability"] == expected and m["env"]["ATEN_CPU_CAPABILITY"] == capability.lower()
