"""Compiled kernels for what PyTorch does slowly on a CPU: so far one, the fused single-token
attention over a bfloat16 KV cache that every decoding step runs (`decode_attention.cpp`).

The extension is compiled on first use with the host's instruction set (`-march=native`, about
20 s, cached by PyTorch under ~/.cache/torch_extensions) and used only where it applies: a CPU
with AVX-512, bfloat16 keys and values, a head layout it takes. Anywhere else, or when
compiling fails (no C++ compiler), or with MEMORY3_KERNELS=0 in the environment, `fused_decode`
returns None and the caller keeps its PyTorch path; the reason is logged once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("decode_attention.cpp")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno"]
_enabled: bool | None = None  # None: from the environment


def set_enabled(enabled: bool | None) -> None:
    """Turn the compiled kernels on or off for this process (None: MEMORY3_KERNELS decides)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("MEMORY3_KERNELS", "1").strip().lower() not in ("0", "off", "false", "no")


def available() -> bool:
    """Whether `fused_decode` runs the compiled kernel here (compiling it now if it was not yet:
    call it at start-up to pay the first build there rather than in the first decoding step)."""
    return enabled() and _extension() is not None


def _cpu_tag() -> str:
    """A short hash of this CPU's instruction set, in the extension's name: a build for one CPU
    (-march=native) is never loaded on another that shares the cache directory (an NFS home)."""
    flags = platform.machine() + platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """PyTorch builds extensions with `ninja` found on PATH. The `ninja` wheel installs it next to
    this interpreter, which is not on PATH when a virtualenv's tools are run by path: add that
    directory for the build only."""
    here = str(Path(sys.executable).parent)
    if shutil.which("ninja") is not None or shutil.which("ninja", path=here) is None:
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = here + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


@functools.cache
def _extension() -> ModuleType | None:
    """The compiled module, or None (logged) where it cannot be had."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        log.info(
            "fused decode attention off: this CPU has no AVX-512 (%s)",
            torch.backends.cpu.get_cpu_capability(),
        )
        return None
    from torch.utils import cpp_extension

    log.info("loading the fused decode attention kernel (compiled on first use, then cached by PyTorch)")
    try:
        with _ninja_on_path():
            ext = cpp_extension.load(
                f"memory3_decode_attention_{_cpu_tag()}", [str(_SOURCE)], extra_cflags=_FLAGS
            )
    except (RuntimeError, OSError, ImportError) as e:  # no compiler, no ninja, a failed build
        log.warning(
            "fused decode attention off: building %s failed (%s); decoding uses matmuls", _SOURCE.name, e
        )
        return None
    if not ext.available():
        log.info("fused decode attention off: the compiler did not target AVX-512")
        return None
    return ext


def fused_decode(q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor | None:
    """softmax(q·kᵀ/√D over visible slots)·v for one new token, or None where the kernel does not
    apply (see the module docstring).

    q (B, H, 1, D); k, v (B, K, S, D) bfloat16 on a CPU, each (S, D) block contiguous;
    visible (B, S) bool. Returns (B, H, 1, D) in q's dtype. Scores, softmax and the weighted
    sum run in float32, so the result is float32 attention over the bfloat16 keys and values.
    """
    B, H, T, D = q.shape
    if (
        T != 1
        or k.dtype != torch.bfloat16
        or v.dtype != torch.bfloat16
        or q.device.type != "cpu"
        or k.stride(-1) != 1
        or k.stride(-2) != D
        or v.stride() != k.stride()
        or not enabled()
    ):
        return None
    ext = _extension()
    if ext is None or not ext.supports(H, k.shape[1], D):
        return None
    out = ext.decode_attention(q[:, :, 0].float(), k, v, visible)
    return out.view(B, H, 1, D).to(q.dtype)
