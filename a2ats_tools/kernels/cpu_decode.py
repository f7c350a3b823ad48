"""The fused CPU decode step (``cpu_decode.cpp``): score, select, re-rank and attend for one layer in one call;
and the nearest-centroid encoding of new keys.

On the CPU the torch path of a decode step is a chain of small ops (gather, top-K, gathers, re-rank, softmax),
each a pass over memory with its own dispatch; this kernel does the same work per (sample, KV head) row in one
pass, on ``torch.get_num_threads()`` threads. It is built on first use with the system C++ compiler (``g++`` or
``$CXX``) into a per-user cache and loaded with ``ctypes``; where no compiler works, :func:`available` is False
and the runtime keeps the torch path. Its reference is the torch path itself
(``A2atsSelector.select`` + ``sparse_decode``), and ``tests/test_cpu_decode.py`` compares the two.

Scope: float32 tables, queries and K/V on the CPU; left-padded batches (each sample its own first row and budget).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from ..selection import kept_rows
from .encode import code_dtype

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=gnu++17", "-shared", "-fPIC")
AGGREGATION_CODES = {"sum": 0, "max": 1, "softmax": 2}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = (
    [_I64, _I64, _I64, ctypes.c_int, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR]
    + [_PTR, _PTR]
    + [_I64, _I64]
    + [_I64] * 5
    + [_PTR, _PTR, ctypes.c_double, ctypes.c_int, ctypes.c_float, _PTR, _PTR, _I64, ctypes.POINTER(_I64), ctypes.c_int]
)


def _cache_dir() -> Path:
    root = os.environ.get("A2ATS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "a2ats_tools"
    )
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (a cached build is never run on another CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """Build (once per source, compiler and CPU) and load the kernel: ``(library, "")`` or ``(None, why not)``."""
    if os.environ.get("A2ATS_CPU_KERNEL", "1") == "0":
        return None, "the fused CPU kernel is turned off (A2ATS_CPU_KERNEL=0)"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found to build the fused CPU kernel (install g++ or set CXX)"
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + cxx.encode() + " ".join(FLAGS).encode() + _cpu_signature().encode())
    target = _cache_dir() / f"cpu_decode-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=300)
            os.replace(tmp, target)  # atomic: a half-written library is never loaded
        except subprocess.CalledProcessError as err:
            detail = err.stderr.decode(errors="replace").strip().splitlines()
            return None, f"building the fused CPU kernel with {cxx} failed: {detail[0] if detail else err}"
        except (OSError, subprocess.SubprocessError) as err:
            return None, f"building the fused CPU kernel failed: {err}"
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        return None, f"loading the fused CPU kernel failed: {err}"
    fn = lib.a2ats_cpu_decode
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    enc = lib.a2ats_cpu_encode
    enc.argtypes, enc.restype = [_I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, ctypes.c_int], ctypes.c_int
    return lib, ""


def available() -> bool:
    """Whether the fused CPU kernel could be built and loaded on this machine (built on the first call)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False (empty when it is True)."""
    return _load()[1]


class StepPlan(NamedTuple):
    """What every layer of one decode step passes the kernel alike (checked once, built by :func:`plan_step`)."""

    cos: torch.Tensor  # [B, d] float32
    sin: torch.Tensor
    offsets: torch.Tensor  # [length] int64
    length: int
    n_sink: int
    window: int
    first: torch.Tensor  # [B] int64
    top: torch.Tensor  # [B] int64
    k: int  # kept rows of the sample that keeps most
    rerank: float
    rerank_aggregation: int
    aggregation: int


def plan_step(
    cos: torch.Tensor,
    sin: torch.Tensor,
    offsets: torch.Tensor,
    length: int,
    n_sink: int,
    window: int,
    top: int | torch.Tensor,
    rerank: float,
    rerank_aggregation: str,
    first: torch.Tensor | None = None,
    aggregation: str = "sum",
) -> StepPlan:
    """The arguments of a decode step that all its layers share, checked and laid out once (see
    :func:`decode_layer` for what they mean)."""
    for t in (cos, sin):
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or t.shape != cos.shape:
            raise ValueError("cos/sin must be [B, d] float32 CPU tensors of one shape")
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < length:
        raise ValueError(f"offsets must be int64 [>= length], got {offsets.dtype} {tuple(offsets.shape)}")
    b = cos.shape[0]
    first = torch.zeros(b, dtype=torch.int64) if first is None else first.to(torch.int64).contiguous()
    top = torch.full((b,), top, dtype=torch.int64) if isinstance(top, int) else top.to(torch.int64).contiguous()
    k = int(kept_rows(length - first, top, n_sink, window).max())
    return StepPlan(
        cos.contiguous(), sin.contiguous(), offsets.contiguous(), length, n_sink, window, first, top, k,
        float(rerank or 0.0), AGGREGATION_CODES[rerank_aggregation], AGGREGATION_CODES[aggregation],
    )


def decode_layer(
    plan: StepPlan,
    q_post: torch.Tensor,
    bucket_cos: torch.Tensor,
    bucket_sin: torch.Tensor,
    tiles: torch.Tensor,
    codes: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One layer's decode attention: ``(out [B, Hq, d] float32, picked rows [B, Hkv, k] int64, rows read)``:
    each row's kept rows in ascending order, then ``-1`` where a sample keeps fewer than the largest ``k``; and
    the K/V rows the step read (every candidate's key and every kept row's value, over all samples and heads).

    ``q_post [B, Hq, d]``: the step's RoPE'd queries, ``cos``/``sin [B, d]`` their rotary factors;
    ``bucket_cos``/``bucket_sin [P, d]``: those of the ``P`` bucket centres in use. The kernel takes each
    query back to pre-RoPE form, sums it over its group (``aggregation=sum``; ``max`` and ``softmax`` keep one
    query per head), rotates it to each bucket centre, builds the float32 tables ``rotated · codebook``
    (``tiles``: from :func:`codebook_tiles`) and scores row ``j`` by ``table[bucket, codes[j]]`` through
    ``offsets [length]`` (int64, ``bucket(t - j) * C``), aggregated over the group's heads by ``aggregation``
    (``max`` of the scores, or ``softmax``: each head's softmax of ``scale`` times its scores over all
    ``length`` rows, summed, as :func:`a2ats_tools.scoring.group_aggregate`); ``codes
    [B, Hkv, >= length]`` int16 in ``[0, C)`` (checked by the kernel as it reads them: a ValueError where one is outside); ``keys``/``values [B, Hkv, cap, d]``
    float32. It keeps the first ``n_sink`` and last ``window`` rows and ``top`` more: the best by approximate
    score, or with ``rerank`` > 0 the best of ``ceil(top * rerank)`` candidates by exact score aggregated over the group (``rerank_aggregation``).
    Left padding: ``first [B]`` (int64) is each sample's first real row, ``top`` may be per sample ``[B]``;
    rows before ``first`` are never kept, and the sinks are the first real rows.

    ``plan``: :func:`plan_step` of the step's ``cos``, ``sin``, ``offsets``, ``length``, ``n_sink``, ``window``,
    ``top``, ``rerank``, ``rerank_aggregation``, ``first`` and ``aggregation``; the runtime plans once per step
    and calls this for each layer.
    """
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(unavailable_reason())
    b, hkv, cap, d = keys.shape
    hq = q_post.shape[1]
    c, buckets = tiles.shape[1] * 16, bucket_cos.shape[0]
    for t in (q_post, bucket_cos, bucket_sin, tiles, keys, values):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError("q_post, bucket cos/sin, tiles, keys and values must be float32 CPU tensors")
    if tiles.shape != (hkv, c // 16, d, 16) or not tiles.is_contiguous() or plan.cos.shape != (b, d):
        raise ValueError(f"unexpected shapes: tiles {tuple(tiles.shape)}, cos {tuple(plan.cos.shape)}")
    if codes.dtype != torch.int16 or not takes_codebook(c):
        raise ValueError(f"the fused CPU kernel reads int16 codes of at most 32767 centroids, got {codes.dtype} "
                         f"codes of {c}")
    q, bucket_cos, bucket_sin = q_post.contiguous(), bucket_cos.contiguous(), bucket_sin.contiguous()
    codes = _rows_contiguous(codes)
    keys, values = _rows_contiguous(keys, 2), _rows_contiguous(values, 2)
    if keys.stride() != values.stride():
        keys, values = keys.contiguous(), values.contiguous()
    heads = 1 if plan.aggregation == 0 else hq // hkv  # score tables per (sample, KV head)
    rows, table = _scratch(hkv * b * heads * buckets * d, hkv * b * heads * buckets * c)
    out = torch.empty(b, hq, d, dtype=torch.float32)
    picked = torch.empty(b, hkv, plan.k, dtype=torch.int64)
    rows_read = _I64(0)
    status = lib.a2ats_cpu_decode(
        b, hkv, buckets, plan.aggregation, c, plan.cos.data_ptr(), plan.sin.data_ptr(), bucket_cos.data_ptr(),
        bucket_sin.data_ptr(), rows.data_ptr(), tiles.data_ptr(), table.data_ptr(), codes.data_ptr(),
        codes.stride(0), codes.stride(1), plan.offsets.data_ptr(), q.data_ptr(), keys.data_ptr(),
        values.data_ptr(), keys.stride(0), keys.stride(1), hq // hkv, d, plan.length, plan.n_sink, plan.window,
        plan.first.data_ptr(), plan.top.data_ptr(), plan.rerank, plan.rerank_aggregation, scale, out.data_ptr(),
        picked.data_ptr(), plan.k, ctypes.byref(rows_read), torch.get_num_threads(),
    )
    if status:
        raise ValueError(f"codes must lie in [0, {c}): a scored row's code is outside it")
    return out, picked, rows_read.value


def encode(keys: torch.Tensor, tiles: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Nearest centroids: ``keys [Hkv, m, d]`` (pre-RoPE, float32) -> codes ``[Hkv, m]`` int16, the argmax over
    codes of ``keys · weight + bias`` (``tiles``: :func:`codebook_tiles` of the encode weight ``[Hkv, C, d]``,
    ``bias [Hkv, C]``; ties keep the lowest code). The same codes as the selector's torch encode up to float
    rounding between near-equidistant centroids, without its ``[m, C]`` distance matrix."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(unavailable_reason())
    hkv, m, d = keys.shape
    c = tiles.shape[1] * 16
    if keys.dtype != torch.float32 or tiles.shape != (hkv, c // 16, d, 16) or bias.shape != (hkv, c):
        raise ValueError(f"unexpected keys {tuple(keys.shape)} {keys.dtype}, tiles {tuple(tiles.shape)}")
    if not takes_codebook(c):
        raise ValueError(f"the fused CPU kernel writes int16 codes: at most 32767 centroids, got {c}")
    keys, bias = keys.contiguous(), bias.float().contiguous()
    codes = torch.empty(hkv, m, dtype=torch.int16)
    lib.a2ats_cpu_encode(hkv, m, d, c, keys.data_ptr(), tiles.data_ptr(), bias.data_ptr(), codes.data_ptr(),
                         torch.get_num_threads())
    return codes


def takes_codebook(num_codes: int) -> bool:
    """Whether the kernel can index a codebook of ``num_codes``: it reads and writes int16 codes only, so a
    larger codebook (int32 codes, :func:`~a2ats_tools.kernels.encode.code_dtype`) stays on the torch path."""
    return code_dtype(num_codes) == torch.int16


_SCRATCH = threading.local()


def _scratch(rows: int, table: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's scratch for the scoring queries and tables, grown as needed and reused by every layer and
    step: a fresh 1.4 MB table per call (batch 4, 7 buckets, 4096 codes) is a fresh mmap, page-faulted in."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < rows + table:
        buf = _SCRATCH.buf = torch.empty(rows + table, dtype=torch.float32)
    return buf[:rows], buf[rows : rows + table]


def codebook_tiles(codebook: torch.Tensor) -> torch.Tensor:
    """``codebook [Hkv, C, d]`` -> ``[Hkv, C/16, d, 16]`` float32: 16 codes side by side per dimension, the
    layout the kernel's table product reads front to back (``C`` must be a multiple of 16)."""
    h, c, d = codebook.shape
    if c % 16:
        raise ValueError(f"the fused CPU kernel needs a codebook size divisible by 16, got {c}")
    return codebook.float().reshape(h, c // 16, 16, d).transpose(2, 3).contiguous()


def _rows_contiguous(t: torch.Tensor, inner: int = 1) -> torch.Tensor:
    """``t`` itself when its last ``inner`` dimensions are packed (any strides for sample and head), else a copy."""
    expected = 1
    for dim in range(t.dim() - 1, t.dim() - 1 - inner, -1):
        if t.shape[dim] > 1 and t.stride(dim) != expected:
            return t.contiguous()
        expected *= t.shape[dim]
    return t
