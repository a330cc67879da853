"""The project's CPU kernels in C (``vnni.c``), built at first use: 4-bit weights times 8-bit
activations on AVX-512 VNNI, LoRA rows in 8 bits, and the rest of a decode step (RMS norm,
the MLP's activation, attention).

PyTorch's int4 CPU kernel (server/engine/int4.py) turns each 4-bit weight into a float and
multiplies in float32: at one row it runs at a third of the speed the machine reads memory,
and its cost grows with the rows (8 rows of a 2048 x 640 layer: 3x one row). llama.cpp's
way is quicker on the same weights: quantize each activation row to 8 bits per group and
sum the products in integers, 64 at a time, with VNNI's VPDPBUSD. ``q4_matmul`` does that
for the int4 layout of this project (per group of input columns a scale and a minimum, the
same quantized weights as the int4 kernel's, re-laid out at load), on the threads of
PyTorch's own OpenMP runtime. The decoder's layers take the activations in two 8-bit halves
(``halves=2``: the remainder of the first rounding in the second, about 15 bits, finer
than the bfloat16 the int4 kernel rounds them to); the logits' screen in one (it only
ranks). Each row is quantized on its own scales and its sums are exact: a row's output is
the same bit for bit alone or in any batch. Measured on a 2-core AVX-512 VNNI Xeon against
the int4 kernel: a 2048 x 640 layer at one row 42 against 74 us, at 8 rows 131 against 253;
Gemma 3's 262144 x 640 screen (one half) 5.6 against 7.5 ms at one row, 10 against 38 ms at 8.

``lora_add`` adds each row's own LoRA delta from blocks held in 8 bits (a quarter of the
float32 bytes; each row reads only its adapter's). ``rms_norm`` (with the residual added),
``act_mul`` (GELU or SiLU of the gate times the up projection) and ``attend_decode`` (a
decode step's q and k norms, rotary embedding, cache writes and attention) each run in one
call what takes torch five to forty operators: on a small model a decode step launched
some 3,500 of them, a few microseconds each. The model's 4-bit layers being on this kernel
(``serves``) is what turns the others on.

The library is compiled with the machine's C compiler (``$CC``, else ``cc`` or ``gcc``; half
a second) into ``$XDG_CACHE_HOME/swapserve/kernels`` (else ``~/.cache``, else the temporary
directory) the first time it is wanted, and loaded with ctypes (the GIL is released while
it runs). Where the CPU lacks AVX-512 VNNI or nothing compiles it, ``unavailable()`` says why
and the int4 kernel serves (``SWAPSERVE_INT4_KERNEL=torch`` chooses it anyway).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from server.engine.hugepages import resident

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("vnni.c")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
CFLAGS = (
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512vnni",
    "-mfma",
    "-mf16c",
    "-fopenmp",
    "-fno-math-errno",
    "-shared",
    "-fPIC",
)
KERNELS = ("auto", "vnni", "torch")
# the layout's blocks: 16 output rows; 8 inputs per step, groups in whole 16-float vectors
BLOCK_ROWS = 16
GROUP_MULTIPLE = 16


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    named = os.environ.get("CC")
    if named:
        return shutil.which(named)
    return shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "swapserve" / "kernels"


def _build(compiler: str) -> Path:
    """The compiled library for this source, compiler and flags (built once, then reused)."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60
    ).stdout
    key = hashlib.sha256(
        SOURCE.read_bytes() + "\0".join((compiler, version, *CFLAGS)).encode()
    ).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "swapserve-kernels"):
        target = folder / f"vnni-{key}.so"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
        except OSError:
            continue  # not writable: the next folder
        try:
            done = subprocess.run(
                [compiler, *CFLAGS, str(SOURCE), "-o", partial],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(partial, target)  # whole or not at all, for processes building at once
        finally:
            Path(partial).unlink(missing_ok=True)
        return target
    raise RuntimeError(f"no writable folder for the compiled kernel ({_cache_dir()})")


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(the library, None) or (None, why not)."""
    missing = [flag for flag in CPU_FLAGS if flag not in cpu_flags()]
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, gcc or $CC) to build it"
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"building it failed: {exc}"
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    c_int = ctypes.c_int
    lib.q4_matmul.argtypes = [p, p, p, p, i64, i64, i64, i64, c_int, p, c_int]
    lib.q4_matmul.restype = c_int
    lib.lora_add.argtypes = [p, i64, i64, i64, i64, p, i64, p, p, p, p, p, p, c_int]
    lib.lora_add.restype = c_int
    lib.rms_norm.argtypes = [p, i64, i64, p, ctypes.c_float, p, p]
    lib.rms_norm.restype = c_int
    lib.act_mul.argtypes = [p, p, i64, c_int, p]
    lib.act_mul.restype = c_int
    f32 = ctypes.c_float
    lib.attend_decode.argtypes = [p, p, p, i64, i64, i64, i64, p, p, f32, p, p, p, p, p]
    lib.attend_decode.argtypes += [i64, i64, i64, f32, p, c_int]
    lib.attend_decode.restype = c_int
    lib.decode_layer.argtypes = [p, p, i64, p, p, p, p, p, p, i64, i64, c_int]
    lib.decode_layer.restype = c_int
    lib.decode_layers.argtypes = [p, i64, p, i64, p, p, p, p, p, p, i64, i64, p, c_int, p]
    lib.decode_layers.restype = c_int
    logger.info("4-bit VNNI kernel loaded (%s)", SOURCE.name)
    return lib, None


def _lib() -> ctypes.CDLL:
    """The loaded library, or an error saying why it is out."""
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"the VNNI kernel is out: {reason}")
    return lib


def _check(status: int) -> None:
    """The C functions' status: 0, or why nothing was written."""
    if status == 1:
        raise ValueError("the kernel refused its inputs: shapes, halves (1 or 2) or adapter slots")
    if status == 2:
        raise MemoryError("the kernel's scratch for the activations could not be allocated")
    if status != 0:
        raise RuntimeError(f"the kernel failed ({status})")


def unavailable() -> str | None:
    """None where the kernel runs here, else why not (CPU flags, no compiler, a failed build)."""
    return _load()[1]


def resolve(setting: str) -> str:
    """SWAPSERVE_INT4_KERNEL -> "vnni" or "torch". auto: vnni where it runs; vnni where it
    cannot run is an error saying why."""
    if setting not in KERNELS:
        raise ValueError(f"int4 kernel must be one of {KERNELS}, not {setting!r}")
    if setting == "torch":
        return "torch"
    reason = unavailable()
    if reason is None:
        return "vnni"
    if setting == "vnni":
        raise ValueError(f"SWAPSERVE_INT4_KERNEL=vnni, but {reason}; use auto or torch")
    logger.info("4-bit layers on PyTorch's int4 kernel: the VNNI kernel is out (%s)", reason)
    return "torch"


def fits(in_features: int, out_features: int, group_size: int) -> bool:
    return (
        group_size % GROUP_MULTIPLE == 0
        and in_features % group_size == 0
        and out_features % BLOCK_ROWS == 0
    )


@dataclass
class Packed:
    """A weight in the kernel's layout (see vnni.c): nibbles, scales and minimums."""

    nibbles: torch.Tensor  # uint8 (out/16 * in/group * group/8 * 64,)
    scales: torch.Tensor  # float16 (out/16, in/group, 16)
    minimums: torch.Tensor  # float16, likewise
    out_features: int
    in_features: int
    group_size: int

    @functools.cached_property
    def pointers(self) -> tuple[int, int, int]:
        """The three tensors' addresses (fixed: the tensors are never resized or moved)."""
        return self.nibbles.data_ptr(), self.scales.data_ptr(), self.minimums.data_ptr()

    def register_on(self, module: torch.nn.Module, prefix: str = "") -> None:
        """Hold the tensors as the module's buffers: moved with it, counted in its size."""
        for name in ("nibbles", "scales", "minimums"):
            module.register_buffer(prefix + name, getattr(self, name), persistent=False)


def pack(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> Packed:
    """int4.quantize_int4's output -- q (out, in) in 0..15 and scales_and_zeros (groups, out,
    2) with W = (q - 8) * scale + zero -- laid out for the kernel: W = scale * q + minimum."""
    out_f, in_f = q.shape
    if not fits(in_f, out_f, group_size):
        raise ValueError(
            f"a {in_f} x {out_f} layer does not fit the VNNI kernel with group size "
            f"{group_size} (in_features a multiple of it, out_features of {BLOCK_ROWS}, the "
            f"group size of {GROUP_MULTIPLE})"
        )
    groups = in_f // group_size
    nib = q.to(torch.uint8).reshape(out_f // 16, 16, groups, group_size // 8, 2, 4)
    nib = nib.permute(0, 2, 3, 1, 5, 4)  # block, group, step, row, j, half
    nibbles = (nib[..., 0] | (nib[..., 1] << 4)).contiguous().reshape(-1)
    sz = scales_and_zeros.float()
    scale, zero = sz[..., 0].t(), sz[..., 1].t()  # (out, groups)

    def lay(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(out_f // 16, 16, groups).permute(0, 2, 1).contiguous().half()

    return Packed(nibbles, lay(scale), lay(zero - 8 * scale), out_f, in_f, group_size)


def dequantize(packed: Packed) -> torch.Tensor:
    """The float (out, in) weight the packed one stands for (for tests and quality checks)."""
    out_f, in_f, g = packed.out_features, packed.in_features, packed.group_size
    groups = in_f // g
    b = packed.nibbles.reshape(out_f // 16, groups, g // 8, 16, 4)
    q = torch.stack([b & 0x0F, b >> 4], dim=-1)  # block, group, step, row, j, half
    q = q.permute(0, 3, 1, 2, 5, 4).reshape(out_f, groups, g).float()

    def unlay(t: torch.Tensor) -> torch.Tensor:
        return t.float().permute(0, 2, 1).reshape(out_f, groups, 1)

    return (q * unlay(packed.scales) + unlay(packed.minimums)).reshape(out_f, in_f)


def matmul(
    x: torch.Tensor, packed: Packed, halves: int = 2, threads: int | None = None
) -> torch.Tensor:
    """x (M, in) -> (M, out) float32 = x @ W^T, on the VNNI kernel. ``halves``: each group of
    a row's inputs in two 8-bit halves (2: about 15 bits, twice the dot products) or one.
    Called for every layer of every step: a few microseconds of Python around the kernel."""
    lib = _lib()
    if x.dim() != 2 or x.shape[1] != packed.in_features:
        raise ValueError(f"expected (rows, {packed.in_features}) inputs, got {tuple(x.shape)}")
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    rows = x.shape[0]
    out = torch.empty(rows, packed.out_features, dtype=torch.float32)
    status = lib.q4_matmul(
        x.data_ptr(),
        *packed.pointers,
        rows,
        packed.out_features,
        packed.in_features,
        packed.group_size,
        halves,
        out.data_ptr(),
        threads or torch.get_num_threads(),
    )
    _check(status)
    return out


# --- LoRA deltas, each row with its own adapter, weights in 8 bits ------------------------


@dataclass
class LoRAPack:
    """The LoRA blocks of every resident adapter on one layer, in 8 bits (see vnni.c): A's
    rows (rank components) one scale each, B transposed one scale per output column and
    adapter. Slot i is the i-th adapter of the packing order; rank 0 where it has no block
    on this layer."""

    a: torch.Tensor  # int8 (R, in)
    a_scale: torch.Tensor  # float32 (R,)
    b: torch.Tensor  # int8 (R, out)
    b_scale: torch.Tensor  # float32 (slots, out)
    offsets: torch.Tensor  # int32 (slots + 1,)
    in_features: int
    out_features: int

    @property
    def slots(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.offsets, self.a, self.a_scale, self.b, self.b_scale

    @functools.cached_property
    def pointers(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self._tensors())


@dataclass
class LoRABlock:
    """One adapter's LoRA block on one layer in 8 bits (quantized once, when the adapter
    comes onto the device; packs are concatenations of these)."""

    a: torch.Tensor  # int8 (r, in)
    a_scale: torch.Tensor  # float32 (r,)
    b: torch.Tensor  # int8 (r, out): B transposed
    b_scale: torch.Tensor  # float32 (out,)


def quantize_lora(a: torch.Tensor, b: torch.Tensor) -> LoRABlock:
    """A (r, in) and B * scaling (out, r) -> 8 bits: A one scale per row, B one per output
    column."""
    a, bt = a.float(), b.float().t()
    a_scale = a.abs().amax(dim=1).clamp_min(1e-30) / 127
    b_scale = bt.abs().amax(dim=0).clamp_min(1e-30) / 127
    return LoRABlock(
        a=torch.round(a / a_scale[:, None]).to(torch.int8).contiguous(),
        a_scale=a_scale.contiguous(),
        b=torch.round(bt / b_scale[None, :]).to(torch.int8).contiguous(),
        b_scale=b_scale.contiguous(),
    )


def pack_lora(blocks: list[LoRABlock | None], in_features: int, out_features: int) -> LoRAPack:
    """Per slot an adapter's block (None: no block on this layer) -> the pack lora_add reads."""
    present = [block for block in blocks if block is not None]
    offsets = [0]
    for block in blocks:
        offsets.append(offsets[-1] + (0 if block is None else block.a.shape[0]))
    none = torch.zeros(out_features)
    # read on every decode step, by rows with different adapters: in 2 MB pages
    return LoRAPack(
        a=resident(torch.cat([p.a for p in present]))
        if present
        else torch.zeros(0, in_features, dtype=torch.int8),
        a_scale=resident(torch.cat([p.a_scale for p in present])) if present else torch.zeros(0),
        b=resident(torch.cat([p.b for p in present]))
        if present
        else torch.zeros(0, out_features, dtype=torch.int8),
        b_scale=resident(torch.stack([none if p is None else p.b_scale for p in blocks]))
        if blocks
        else torch.zeros(0, out_features),
        offsets=torch.tensor(offsets, dtype=torch.int32),
        in_features=in_features,
        out_features=out_features,
    )


def lora_add(
    out: torch.Tensor, x: torch.Tensor, pack: LoRAPack, slots: torch.Tensor, tokens: int = 1
) -> None:
    """out (M, out) float32 += each row's LoRA delta, in place. x (M, in); ``slots`` (M /
    tokens,) int32: the pack slot of each sequence row (-1: none), whose ``tokens``
    consecutive rows of x share it."""
    lib = _lib()
    rows = x.shape[0]
    if (
        x.dim() != 2
        or x.shape[1] != pack.in_features
        or out.shape != (rows, pack.out_features)
        or out.dtype != torch.float32
        or not out.is_contiguous()
        or slots.dtype != torch.int32
        or len(slots) * tokens != rows
    ):
        raise ValueError(
            f"lora_add: inputs {tuple(x.shape)}, output {tuple(out.shape)} {out.dtype}, "
            f"{len(slots)} slots x {tokens} tokens do not fit a {pack.in_features} -> "
            f"{pack.out_features} pack"
        )
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    offsets, a, a_scale, b, b_scale = pack.pointers
    status = lib.lora_add(
        x.data_ptr(),
        rows,
        tokens,
        pack.in_features,
        pack.out_features,
        slots.data_ptr(),
        pack.slots,
        offsets,
        a,
        a_scale,
        b,
        b_scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    _check(status)


# --- the rest of a decode step: norms, the MLP's activation, attention ---------------------


def serves(model: torch.nn.Module) -> bool:
    """Whether the model's 4-bit layers are on this kernel (its other CPU kernels then serve
    the model's decode step too: the LoRA rows, norms, activations and attention)."""
    return any(getattr(m, "kernel", None) == "vnni" for m in model.modules())


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., dim) float32 -> x / sqrt(mean(x^2) + eps) * weight (weight float32 (dim,)),
    plus ``residual`` (x's shape) where given, in one call."""
    lib = _lib()
    dim = x.shape[-1]
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape != (dim,):
        raise ValueError(f"rms_norm: float32 (..., {dim}) and ({dim},) wanted")
    if not x.is_contiguous():
        x = x.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    add = 0
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != torch.float32:
            raise ValueError(f"rms_norm: a residual of {tuple(x.shape)} float32 wanted")
        residual = residual.contiguous()
        add = residual.data_ptr()
    out = torch.empty_like(x)
    _check(
        lib.rms_norm(x.data_ptr(), x.numel() // dim, dim, w.data_ptr(), eps, add, out.data_ptr())
    )
    return out


# transformers' activation modules this kernel computes: GELU's tanh approximation, SiLU
ACTIVATIONS = {
    "GELUTanh": 0,
    "NewGELUActivation": 0,
    "FastGELUActivation": 0,
    "SiLUActivation": 1,
    "SiLU": 1,
}


def act_mul(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, float32, in one pass; ``activation`` a class name of ACTIVATIONS."""
    lib = _lib()
    if gate.shape != up.shape or gate.dtype != torch.float32 or up.dtype != torch.float32:
        raise ValueError("act_mul: two float32 tensors of one shape wanted")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _check(
        lib.act_mul(
            gate.data_ptr(), up.data_ptr(), gate.numel(), ACTIVATIONS[activation], out.data_ptr()
        )
    )
    return out


def _step_cache_fits(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n: int,
) -> bool:
    """What a decode step's attention takes beside its rows, for n rows: the cache (rows,
    kv_heads, capacity, dim) float32, positions (n,) int64, cos and sin (n, dim) float32,
    each contiguous."""
    dim = keys.shape[-1]
    return (
        values.shape == keys.shape
        and all(t.dtype == torch.float32 and t.is_contiguous() for t in (keys, values, cos, sin))
        and positions.shape == (n,)
        and positions.dtype == torch.int64
        and cos.shape == (n, dim)
        and sin.shape == (n, dim)
    )


def attend_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """One decode step's attention for n rows (see vnni.c): q (n, heads * dim), k and v
    (n, kv_heads * dim) float32 from the projections; their heads through the RMS norms
    (``q_norm`` / ``k_norm`` weights (dim,), None: none) and the rotary embedding (cos and
    signed sin (n, dim)); k and v written into the cache ``keys`` / ``values`` (rows,
    kv_heads, capacity, dim) at each row's position (``positions`` (n,) int64); each query
    head attends over its row's columns up to its position (the last ``window`` of them
    where given). Returns (n, heads * dim)."""
    lib = _lib()
    n = q.shape[0]
    rows, kv_heads, capacity, dim = keys.shape
    heads = q.shape[-1] // dim
    tensors = (q, k, v) + tuple(t for t in (q_norm, k_norm) if t is not None)
    if (
        not _step_cache_fits(keys, values, positions, cos, sin, n)
        or any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors)
        or q.shape != (n, heads * dim)
        or k.shape != (n, kv_heads * dim)
        or v.shape != k.shape
    ):
        raise ValueError("attend_decode: the tensors' shapes, dtypes or layouts do not fit")
    out = torch.empty(n, heads * dim, dtype=torch.float32)
    status = lib.attend_decode(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        n,
        heads,
        kv_heads,
        dim,
        q_norm.data_ptr() if q_norm is not None else None,
        k_norm.data_ptr() if k_norm is not None else None,
        eps,
        cos.data_ptr(),
        sin.data_ptr(),
        positions.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        rows,
        capacity,
        window or 0,
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    _check(status)
    return out


# --- a whole decoder layer of a decode step ------------------------------------------------

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class _Q4(ctypes.Structure):
    _fields_ = [("w", _p), ("sc", _p), ("mn", _p), ("n", _i64), ("k", _i64), ("g", _i64)]


class _LoRA(ctypes.Structure):
    _fields_ = [
        ("off", _p),
        ("a", _p),
        ("a_scale", _p),
        ("b", _p),
        ("b_scale", _p),
        ("slots", _i64),
        ("k", _i64),
        ("n", _i64),
    ]


class _Attention(ctypes.Structure):
    _fields_ = [
        ("heads", _i64),
        ("kv_heads", _i64),
        ("dim", _i64),
        ("window", _i64),
        ("q_norm", _p),
        ("k_norm", _p),
        ("eps", _f32),
        ("scale", _f32),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("hidden", _i64),
        ("inter", _i64),
        ("gemma", _i32),
        ("act", _i32),
        ("halves", _i32),
        ("pad", _i32),
        ("eps", _f32),
        ("pad2", _f32),
        ("norm_in", _p),
        ("norm_post_attn", _p),
        ("norm_pre_ff", _p),
        ("norm_post_ff", _p),
        ("attention", _Attention),
        ("proj", _Q4 * 7),
        ("lora", _LoRA * 7),
    ]


@dataclass
class LayerParts:
    """One decoder layer's weights as the decoder finds them (see DecodeLayer)."""

    projections: list[Packed]  # q, k, v, o, gate, up, down
    loras: list[LoRAPack | None]  # each projection's 8-bit LoRA blocks, None: none
    norms: list[torch.Tensor | None]  # float32 (hidden,): input, post-attention, Gemma's
    # pre- and post-feedforward (None for Llama)
    eps: float  # the layer norms'
    q_norm: torch.Tensor | None  # float32 (head_dim,), Gemma's
    k_norm: torch.Tensor | None
    qk_eps: float
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None
    scale: float
    activation: str  # a class name of ACTIVATIONS


class DecodeLayer:
    """A whole decoder layer of a decode step in one call (vnni.c's decode_layer): norms,
    the seven 4-bit projections with each row's LoRA delta, attention and the gated MLP in
    one parallel region, with the same arithmetic as the kernels called one by one.
    Holds the tensors its C description points at."""

    def __init__(self, parts: LayerParts, halves: int = 2):
        _lib()
        self.parts = parts  # keeps every pointed-at tensor alive
        gemma = parts.norms[2] is not None
        if len(parts.projections) != 7 or len(parts.loras) != 7:
            raise ValueError("a decode layer takes seven projections")
        spec = _Layer()
        spec.hidden = parts.projections[0].in_features
        spec.inter = parts.projections[4].out_features
        spec.gemma, spec.act, spec.halves = int(gemma), ACTIVATIONS[parts.activation], halves
        spec.eps = parts.eps
        for name, norm in zip(
            ("norm_in", "norm_post_attn", "norm_pre_ff", "norm_post_ff"), parts.norms, strict=True
        ):
            setattr(spec, name, norm.data_ptr() if norm is not None else None)
        att = spec.attention
        att.heads, att.kv_heads, att.dim = parts.heads, parts.kv_heads, parts.head_dim
        att.window, att.eps, att.scale = parts.window or 0, parts.qk_eps, parts.scale
        att.q_norm = parts.q_norm.data_ptr() if parts.q_norm is not None else None
        att.k_norm = parts.k_norm.data_ptr() if parts.k_norm is not None else None
        for i, (packed, lora) in enumerate(zip(parts.projections, parts.loras, strict=True)):
            w = spec.proj[i]
            w.w, w.sc, w.mn = packed.pointers
            w.n, w.k, w.g = packed.out_features, packed.in_features, packed.group_size
            if lora is not None:
                lo = spec.lora[i]
                lo.off, lo.a, lo.a_scale, lo.b, lo.b_scale = lora.pointers
                lo.slots, lo.k, lo.n = lora.slots, lora.in_features, lora.out_features
        self.spec = spec
        self.address = ctypes.addressof(spec)
        self.heads, self.kv_heads, self.head_dim = parts.heads, parts.kv_heads, parts.head_dim

    def __call__(
        self,
        h: torch.Tensor,
        slots: torch.Tensor | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> None:
        """h (n, hidden) float32, contiguous, in place. ``slots`` (n,) int32: each row's LoRA
        slot (-1: none), None: no row has an adapter; the cache, positions (n,) int64 and
        cos / sin (n, head_dim) as for attend_decode."""
        decode_layers([self], h, [slots], [keys], [values], positions, [cos], [sin])


class Pause:
    """A flag that ends ``decode_layers`` after the layer under way: another thread sets it
    (a request came in) so that the step's thread can work between two layers."""

    def __init__(self) -> None:
        self._flag = ctypes.c_int32(0)
        self.address = ctypes.addressof(self._flag)

    def set(self) -> None:
        self._flag.value = 1

    def clear(self) -> None:
        self._flag.value = 0

    def is_set(self) -> bool:
        return bool(self._flag.value)


def _pointers(tensors: Sequence[torch.Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(
        *(t.data_ptr() if t is not None else None for t in tensors)
    )


def decode_layers(
    kernels: list[DecodeLayer],
    h: torch.Tensor,
    slots: list[torch.Tensor | None],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    positions: torch.Tensor,
    cos: list[torch.Tensor],
    sin: list[torch.Tensor],
    pause: Pause | None = None,
) -> int:
    """Consecutive layers of a decode step in one call (vnni.c's decode_layers): layer i of
    the list as ``kernels[i](h, slots[i], keys[i], values[i], positions, cos[i], sin[i])``
    would run it, without returning to Python between layers (the GIL stays free for the
    whole run). Returns how many ran: all of them, or fewer where ``pause`` was set (at
    least one)."""
    count = len(kernels)
    if not count or not (len(slots) == len(keys) == len(values) == len(cos) == len(sin) == count):
        raise ValueError("decode_layers: one slot, cache and rotary table per layer")
    n = h.shape[0]
    shape = keys[0].shape  # one rows and capacity for every layer's cache
    fits = h.dim() == 2 and h.dtype == torch.float32 and h.is_contiguous() and len(shape) == 4
    for kernel, slot, k, v, c, s in zip(kernels, slots, keys, values, cos, sin, strict=True):
        fits = fits and (
            kernel.spec.hidden == h.shape[1]
            and (kernel.kv_heads, kernel.head_dim) == (shape[1], shape[3])
            and k.shape == shape
            and (slot is None or (slot.shape == (n,) and slot.dtype == torch.int32))
            and (slot is None or slot.is_contiguous())
            and _step_cache_fits(k, v, positions, c, s, n)
        )
    if not fits:
        raise ValueError("decode_layers: the tensors' shapes, dtypes or layouts do not fit")
    rows, _, capacity, _ = shape
    done = ctypes.c_int64(0)
    status = _lib().decode_layers(
        (ctypes.c_void_p * count)(*(kernel.address for kernel in kernels)),
        count,
        h.data_ptr(),
        n,
        _pointers(slots),
        _pointers(cos),
        _pointers(sin),
        positions.data_ptr(),
        _pointers(keys),
        _pointers(values),
        rows,
        capacity,
        pause.address if pause is not None else None,
        torch.get_num_threads(),
        ctypes.byref(done),
    )
    _check(status)
    return int(done.value)
