"""Builds cbkernels._C: the CPU kernels always, the CUDA kernels when the build has CUDA.

Environment:
  CBKERNELS_BUILD_CUDA   "auto" (default: build CUDA when nvcc/CUDA_HOME and a CUDA build of torch
                         exist; never probes for a visible GPU), "1" (required: fail if impossible), "0" (skip).
  CBKERNELS_CUDA_ARCH    arch list for nvcc, default "8.0;9.0+PTX" (sm_80, sm_90 and PTX for newer GPUs).
  CBKERNELS_NO_EXTENSION "1": install the pure-Python package only (reference + Triton backends).
  CBKERNELS_SANITIZE     "1": build the CPU part with AddressSanitizer and UBSan (tools/asan_check.sh).

CPU vector code: a source named *_avx2.cpp / *_avx512.cpp is compiled with that instruction set's flags
and CPU_CAPABILITY macro (ATen's Vectorized<float> picks its implementation from those), so one wheel
carries a generic, an AVX2 and an AVX-512 variant and chooses among them at run time.
"""
import os
import platform
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                    "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def _cuda_wanted(torch, cpp_extension) -> bool:
    mode = os.environ.get("CBKERNELS_BUILD_CUDA", "auto").lower()
    if mode in ("0", "false", "no"):
        return False
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode in ("1", "true", "yes") and not possible:
        raise RuntimeError(
            "CBKERNELS_BUILD_CUDA=1 but the build has no CUDA: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return possible


def _extensions():
    if os.environ.get("CBKERNELS_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from packaging.version import Version
    from torch.utils import cpp_extension

    if Version(torch.__version__.split("+")[0]) < Version("2.6"):
        raise RuntimeError(f"cbkernels needs torch >= 2.6, found {torch.__version__}")

    sources = ["csrc/cbkernels.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cpu").glob("*.cpp"))
    if platform.machine().lower() not in ("x86_64", "amd64"):
        # The AVX2 / AVX-512 variants exist for x86 only (csrc/cpu/ops.cpp would also need them compiled
        # out elsewhere: not done yet, so non-x86 builds are untested).
        sources = [s for s in sources if not any(s.endswith(k) for k in ISA_FLAGS)]
    # -g0: no debug information (Python's sysconfig flags bring -g): it made up most of the shared library's
    # size and a good part of the compile time of the kernel templates.
    cxx = ["-O3", "-g0", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-math-errno"]
    link = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is a header template: without -fopenmp it compiles to a plain serial loop, in
        # silence. Linking with -fopenmp records libgomp.so.1, which at load time resolves to the libgomp
        # torch has already loaded (same soname), so torch.set_num_threads governs these loops too.
        cxx += ["-fopenmp"]
        link += ["-fopenmp"]
    if os.environ.get("CBKERNELS_SANITIZE") == "1":
        cxx += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        link += ["-fsanitize=address,undefined"]
    # csrc/ on the include path: both backends include the layer they share as "common/...".
    kwargs = dict(name="cbkernels._C", sources=sources, include_dirs=[str(ROOT / "csrc")],
                  extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=False)
    if _cuda_wanted(torch, cpp_extension):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("CBKERNELS_CUDA_ARCH", "8.0;9.0+PTX"))
        kwargs["sources"] += ["csrc/cuda/launch.cu", "csrc/cuda/bindings.cpp"]
        # No --use_fast_math: it would approximate every expf/logf/division and flush denormals everywhere.
        # The kernels choose their approximations per function instead, each with its error bound
        # (csrc/cuda/device_math.cuh), where they run once per element; per-row math stays accurate.
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo"]
        kwargs["define_macros"] = [("CBKERNELS_WITH_CUDA", "1")]
        ext = cpp_extension.CUDAExtension(**kwargs)
    else:
        ext = cpp_extension.CppExtension(**kwargs)

    class BuildWithIsaVariants(cpp_extension.BuildExtension):
        """BuildExtension whose compile step adds per-ISA flags to the *_avx2 / *_avx512 sources."""

        def build_extension(self, extension):
            compile_all = self.compiler.compile

            def compile_grouped(sources, *args, extra_postargs=None, **kw):
                objects = []
                for suffix in [None, *ISA_FLAGS]:
                    group = [s for s in sources if (suffix is None and not any(s.endswith(k) for k in ISA_FLAGS))
                             or (suffix is not None and s.endswith(suffix))]
                    if not group:
                        continue
                    post = extra_postargs
                    if suffix is not None:
                        post = dict(extra_postargs) if isinstance(extra_postargs, dict) else {"cxx": list(extra_postargs or [])}
                        post["cxx"] = list(post.get("cxx", [])) + ISA_FLAGS[suffix]
                    objects += compile_all(group, *args, extra_postargs=post, **kw)
                return objects

            self.compiler.compile = compile_grouped
            try:
                super().build_extension(extension)
            finally:
                self.compiler.compile = compile_all

    return [ext], {"build_ext": BuildWithIsaVariants}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
