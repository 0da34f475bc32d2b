"""Build script for tileformer.

Builds the pure-Python packages `transformer` and `triton_kernels`, plus two
optional C++ extensions from `csrc/`:

* ``transformer._C``      -- the GPU kernels (nvcc, ``TORCH_LIBRARY(tileformer)``),
  built when torch is a CUDA build and nvcc is found;
* ``transformer._C_emu``  -- the same kernel sources compiled by g++ against the
  host-emulation header (``TORCH_LIBRARY(tileformer_emu)``), so the CUDA
  kernels run on CPU tensors; built whenever a C++ compiler is present.

Environment variables:
  TILEFORMER_SKIP_CUDA_BUILD=1   pure-Python install (no extension at all)
  TILEFORMER_SKIP_EMU_BUILD=1    skip the CPU-emulated extension
  TILEFORMER_CUDA_ARCHS          arch list, default "8.0;9.0a"
  TILEFORMER_CUDA_HEADDIMS       attention head dims to instantiate (see csrc/)
  MAX_JOBS                       parallel compile jobs (torch's BuildExtension)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"[tileformer setup] {msg}", file=sys.stderr)


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _nvidia_include_dirs():
    """Headers of the CUDA pip packages (cusparse.h etc.); torch's CUDAContext.h needs them."""
    dirs = []
    for p in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/cusparse/include",
                    "nvidia/cublas/include", "nvidia/cusolver/include", "nvidia/curand/include",
                    "nvidia/cufft/include"):
            d = os.path.join(p, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def _extensions():
    """Return (ext_modules, cmdclass). Never raises: a missing toolchain means a pure-Python install."""
    if _flag("TILEFORMER_SKIP_CUDA_BUILD"):
        _say("TILEFORMER_SKIP_CUDA_BUILD=1: skipping all C++/CUDA extensions (pure-Python install).")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # torch not importable in the build env
        _say(f"torch is not importable in the build environment ({e}); skipping the C++/CUDA extensions "
             "(pure-Python install). To build them, install torch first and use "
             "`pip install --no-build-isolation .`")
        return [], {}

    exts = []
    csrc = os.path.join(ROOT, "csrc")
    common_cxx = ["-O3", "-std=c++20"]

    # ---- CPU-emulated build of the CUDA kernels (g++ only) ---------------------------
    emu_sources = sorted(glob.glob(os.path.join(csrc, "emu_bindings.cpp")))
    if _flag("TILEFORMER_SKIP_EMU_BUILD"):
        _say("TILEFORMER_SKIP_EMU_BUILD=1: skipping the CPU-emulated extension transformer._C_emu.")
    elif emu_sources:
        exts.append(cpp_extension.CppExtension(
            name="transformer._C_emu",
            sources=[os.path.relpath(s, ROOT) for s in emu_sources],
            include_dirs=[csrc],
            define_macros=[("TILEFORMER_EMULATE", "1")],
            extra_compile_args={"cxx": common_cxx + ["-pthread"]},
            extra_link_args=["-pthread"],
        ))

    # ---- GPU build (nvcc) ----------------------------------------------------------------
    cuda_home = _cuda_home()
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} is a CPU-only build; skipping the CUDA extension transformer._C.")
    elif cuda_home is None:
        _say("nvcc not found (set CUDA_HOME); skipping the CUDA extension transformer._C.")
    else:
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        archs = os.environ.get("TILEFORMER_CUDA_ARCHS", "8.0;9.0a")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        cu_sources = sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
        cu_sources = [s for s in cu_sources if "/tests/" not in s]
        sources = [os.path.join(csrc, "bindings.cpp")] + cu_sources
        nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                      "--expt-relaxed-constexpr", "-Xptxas=-v,-warn-spills,-warn-lmem-usage"]
        headdims = os.environ.get("TILEFORMER_CUDA_HEADDIMS")
        macros = [("TILEFORMER_CUDA", "1")]
        if headdims:
            macros.append(("TILEFORMER_HEADDIMS", '"' + headdims + '"'))
        exts.append(cpp_extension.CUDAExtension(
            name="transformer._C",
            sources=[os.path.relpath(s, ROOT) for s in sources],
            include_dirs=[csrc] + _nvidia_include_dirs(),
            define_macros=macros,
            extra_compile_args={"cxx": common_cxx, "nvcc": nvcc_flags},
        ))
        _say(f"building transformer._C for archs {archs} with CUDA at {cuda_home} ({len(cu_sources)} .cu files)")

    if not exts:
        return [], {}
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="tileformer",
    version="0.1.0",
    description="A Transformer whose hot paths are hand-written Triton and CUDA C++ kernels",
    packages=find_packages(include=["transformer", "transformer.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "pytest-benchmark"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
