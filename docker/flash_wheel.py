"""Does a prebuilt flash-attn wheel fit the torch, CUDA and Python of this image?

A flash-attn release wheel is named after what its CUDA extension was compiled against:

    flash_attn-<version>+cu<CUDA major>torch<torch major.minor>cxx11abi<TRUE|FALSE>-cp<XY>-cp<XY>-linux_<arch>.whl

A wheel that disagrees with the installed torch in any of the four tags installs without complaint
and then fails at import with an undefined C++ symbol, so the image build checks before and after:

    python flash_wheel.py check WHEEL_NAME   # after torch is installed; exit 1 lists every mismatch
    python flash_wheel.py import             # after flash-attn is installed; exit 1 on a broken build

Standard library only: it runs in the Dockerfile's builder stage and in the consistency test.
"""

from __future__ import annotations

import os
import re
import sys

WHEEL_NAME = re.compile(
    r"^flash_attn-(?P<version>[0-9][0-9a-z.]*)"
    r"\+cu(?P<cuda>\d+)torch(?P<torch>\d+\.\d+)cxx11abi(?P<abi>TRUE|FALSE)"
    r"-(?P<python>cp\d+)-(?P=python)-linux_(?P<arch>x86_64|aarch64)\.whl$"
)
# PyTorch 2.7 moved its Linux pip wheels to manylinux_2_28 and the C++11 ABI; older wheels used the old ABI.
FIRST_CXX11_ABI_PIP_TORCH = (2, 7)
TAGS = ("cuda", "torch", "abi", "python")


def parse_wheel_name(name: str) -> dict[str, str]:
    """The tags of a flash-attn wheel file name; ValueError when it is not one."""
    match = WHEEL_NAME.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a flash-attn release wheel name "
                         "(flash_attn-V+cuXtorchA.Bcxx11abiTRUE-cpXY-cpXY-linux_x86_64.whl)")
    return match.groupdict()


def major_minor(version: str) -> tuple[int, int]:
    """'2.8.0+cu128' -> (2, 8)."""
    parts = re.findall(r"\d+", version.split("+")[0])
    return int(parts[0]), int(parts[1])


def pip_torch_uses_cxx11_abi(torch_version: str) -> bool:
    """Whether the torch wheels on PyPI / download.pytorch.org of this version use the C++11 ABI."""
    return major_minor(torch_version) >= FIRST_CXX11_ABI_PIP_TORCH


def expected_tags(torch_version: str, cuda_version: str, python_version: str, cxx11_abi: bool) -> dict[str, str]:
    """The wheel tags that fit: torch '2.8.0', CUDA '12.8.1', Python '3.12', ABI True ->
    {'cuda': '12', 'torch': '2.8', 'abi': 'TRUE', 'python': 'cp312'}."""
    torch_major, torch_minor = major_minor(torch_version)
    py_major, py_minor = major_minor(python_version)
    return {"cuda": cuda_version.split(".")[0], "torch": f"{torch_major}.{torch_minor}",
            "abi": "TRUE" if cxx11_abi else "FALSE", "python": f"cp{py_major}{py_minor}"}


def mismatches(wheel_name: str, expected: dict[str, str]) -> list[str]:
    """One line per tag of the wheel that differs from `expected`."""
    tags = parse_wheel_name(wheel_name)
    return [f"{tag}: wheel has {tags[tag]!r}, this image needs {expected[tag]!r}"
            for tag in TAGS if tags[tag] != expected[tag]]


def installed_tags() -> dict[str, str]:
    """The tags of the torch installed in this interpreter (and of the CUDA base image, when set)."""
    import torch

    cuda = torch.version.cuda or os.environ.get("CUDA_VERSION", "")
    if not cuda:
        raise SystemExit("flash-attn needs a CUDA build of torch; this torch is CPU-only (set WITH_FLASH_ATTN=0)")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return expected_tags(torch.__version__, cuda, python, bool(torch._C._GLIBCXX_USE_CXX11_ABI))


def check(wheel_name: str) -> int:
    problems = mismatches(wheel_name, installed_tags())
    wheel_cuda, base_cuda = parse_wheel_name(wheel_name)["cuda"], os.environ.get("CUDA_VERSION", "")
    if base_cuda and base_cuda.split(".")[0] != wheel_cuda:
        problems.append(f"cuda: the base image has CUDA {base_cuda}, the wheel is for CUDA {wheel_cuda}")
    if problems:
        print(f"error: flash-attn wheel {wheel_name} does not fit this image:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print("Pick the matching wheel from https://github.com/Dao-AILab/flash-attention/releases "
              "(build arg FLASH_ATTN_WHEEL), build from source (FLASH_ATTN_SOURCE_BUILD=1), "
              "or leave flash-attn out (WITH_FLASH_ATTN=0).", file=sys.stderr)
        return 1
    print(f"flash-attn wheel {wheel_name} fits torch, CUDA, Python and the C++ ABI of this image")
    return 0


def import_check() -> int:
    """Load the compiled extension. Build machines have no GPU driver, so only a missing libcuda is forgiven."""
    import torch  # noqa: F401  (loads the libraries the extension links against)

    try:
        import flash_attn_2_cuda  # noqa: F401
    except ImportError as err:
        if "libcuda.so" in str(err):
            print(f"flash-attn imports up to the GPU driver, which only the GPU host provides ({err})")
            return 0
        print(f"error: the installed flash-attn does not load against this torch: {err}", file=sys.stderr)
        return 1
    print("flash-attn extension loads")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"] and len(argv) == 2:
        return check(argv[1])
    if argv == ["import"]:
        return import_check()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
