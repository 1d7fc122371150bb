"""Tensor-by-tensor safetensors reading and writing with bounded memory.

``SafetensorsReader`` memory-maps one file and copies out one tensor at a time;
after the copy it tells the kernel to drop the mapped pages again
(``madvise(MADV_DONTNEED)``), so reading a 16 GB checkpoint tensor by tensor
keeps the resident set near the size of the largest tensor instead of growing
with every page touched.

``write_safetensors`` writes a file whose tensors come either from memory or
from byte ranges of other safetensors files (copied in chunks), so shards can
be assembled from per-layer part files without loading them. The layout is the
one the ``safetensors`` package writes (8-byte little-endian header length, a
JSON header padded with spaces to a multiple of 8, tensors sorted by dtype size
so every tensor is aligned to its element size); the tests read every written
file back with the ``safetensors`` package itself.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_CHUNK = 64 << 20
_PAGE = mmap.PAGESIZE


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return NAMES[dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot store {dtype}") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise ValueError(f"tensor {self.name!r} has dtype {self.dtype}, which lowbit does not read") from None


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """-> (tensor infos by name, the ``__metadata__`` dict)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if n > size - 8 or n > 100 << 20:
            raise ValueError(f"{path} is not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupted safetensors header ({e})") from None
    base = 8 + n
    meta = header.pop("__metadata__", None) or {}
    infos = {}
    for name, h in header.items():
        a, b = h["data_offsets"]
        if base + b > size:
            raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {base + b}, the file has {size}")
        infos[name] = TensorInfo(name, h["dtype"], tuple(h["shape"]), base + a, base + b)
    return infos, meta


class SafetensorsReader:
    """One safetensors file, memory-mapped; ``get(name)`` copies one tensor out."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.infos, self.metadata = read_header(self.path)
        self._file = open(self.path, "rb")
        size = self.path.stat().st_size
        self._mm = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ) if size else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self._file.close()

    def keys(self) -> list[str]:
        return list(self.infos)

    def _release(self, start: int, end: int) -> None:
        """Drop the pages of [start, end) from this process's resident set."""
        if self._mm is None or end <= start or not hasattr(self._mm, "madvise"):
            return
        a = start // _PAGE * _PAGE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, a, end - a)
        except (OSError, ValueError):  # not fatal: the kernel reclaims the pages under pressure anyway
            pass

    def _bytes(self, start: int, end: int) -> torch.Tensor:
        out = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # frombuffer warns that the mapping is read-only
                src = torch.frombuffer(self._mm, dtype=torch.uint8, count=end - start, offset=start)
            out.copy_(src)
            del src
            self._release(start, end)
        return out

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a new CPU tensor (a copy; the file stays untouched)."""
        info = self.infos[name]
        raw = self._bytes(info.start, info.end)
        return raw.view(info.torch_dtype).reshape(info.shape)


# ------------------------------------------------------------------ writing


@dataclass(frozen=True)
class Entry:
    """One tensor to write: from memory (``tensor``) or from a byte range of a file (``source``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    tensor: torch.Tensor | None = None
    source: tuple[str, int, int] | None = None  # (path, start, end)
    make: Callable[[], torch.Tensor] | None = None  # made when written (one tensor in memory at a time)

    @staticmethod
    def of(name: str, t: torch.Tensor) -> "Entry":
        t = t.detach().to("cpu").contiguous()
        return Entry(name, dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size(), tensor=t)

    @staticmethod
    def lazy(name: str, dtype: torch.dtype, shape: tuple[int, ...], make: Callable[[], torch.Tensor]) -> "Entry":
        n = 1
        for v in shape:
            n *= int(v)
        return Entry(name, dtype_name(dtype), tuple(shape), n * torch.empty((), dtype=dtype).element_size(),
                     make=make)

    @staticmethod
    def from_file(info: TensorInfo, path: str | os.PathLike, name: str | None = None) -> "Entry":
        return Entry(name or info.name, info.dtype, info.shape, info.nbytes, source=(str(path), info.start, info.end))

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()


class _HashingFile:
    """A file whose written bytes also feed a hash (e.g. hashlib.sha256())."""

    def __init__(self, f, hasher):
        self.f, self.hasher = f, hasher

    def write(self, b) -> None:
        self.f.write(b)
        if self.hasher is not None:
            self.hasher.update(b)


def _write_entry(f, e: Entry, files: dict) -> None:
    if e.make is not None:
        t = e.make().detach().to("cpu").contiguous()
        if dtype_name(t.dtype) != e.dtype or tuple(t.shape) != tuple(e.shape):
            raise ValueError(f"{e.name}: made a {t.dtype} {list(t.shape)} tensor, announced {e.dtype} {list(e.shape)}")
        if e.nbytes:
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        return
    if e.tensor is not None:
        if e.nbytes:
            f.write(e.tensor.reshape(-1).view(torch.uint8).numpy().data)
        return
    path, start, end = e.source
    src = files.get(path)
    if src is None:
        src = files[path] = open(path, "rb")
    src.seek(start)
    left = end - start
    while left:
        buf = src.read(min(left, _CHUNK))
        if not buf:
            raise IOError(f"{path} ended early while copying {e.name!r}")
        f.write(buf)
        left -= len(buf)


def write_safetensors(path: str | os.PathLike, entries: Iterable[Entry], metadata: dict | None = None,
                      on_entry: Callable[[Entry], None] | None = None, hasher=None) -> int:
    """Write ``entries`` to ``path`` (atomically: a temporary file, then a rename). -> bytes
    written. ``hasher`` (e.g. hashlib.sha256()) sees every byte written."""
    entries = list(entries)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"cannot write {path}: tensor name(s) {dup[:3]} used twice")
    # larger element sizes first keeps every tensor aligned to its element size (what safetensors does)
    order = sorted(range(len(entries)), key=lambda i: -entries[i].itemsize)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for i in order:
        e = entries[i]
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    files: dict = {}
    try:
        with open(tmp, "wb") as raw:
            f = _HashingFile(raw, hasher)
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for i in order:
                _write_entry(f, entries[i], files)
                if on_entry:
                    on_entry(entries[i])
            raw.flush()
            os.fsync(raw.fileno())
    finally:
        for src in files.values():
            src.close()
    os.replace(tmp, path)
    return 8 + len(hb) + off


def shard_names(n: int) -> list[str]:
    """Hugging Face shard file names: model.safetensors, or model-0000i-of-0000n.safetensors."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Cut entries, in order, into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_sharded(out_dir: str | os.PathLike, entries: list[Entry], max_bytes: int,
                  metadata: dict | None = None, progress: Callable[[Entry], None] | None = None) -> list[str]:
    """Write a Hugging Face sharded checkpoint (with model.safetensors.index.json when
    there is more than one shard). -> the file names written."""
    out = Path(out_dir)
    shards = plan_shards(entries, max_bytes)
    files = shard_names(len(shards))
    weight_map = {}
    for fname, shard in zip(files, shards):
        write_safetensors(out / fname, shard, metadata, on_entry=progress)
        weight_map.update({e.name: fname for e in shard})
    index = out / "model.safetensors.index.json"
    if len(files) > 1:
        total = sum(e.nbytes for e in entries)
        tmp = index.with_name(index.name + ".tmp")
        tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        os.replace(tmp, index)
    elif index.exists():
        index.unlink()
    return files


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a Hugging Face model directory (index.json, model.safetensors or *.safetensors)."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{index} is corrupted ({type(e).__name__}: {e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names {missing[0]}, which is not in {d}")
        return [d / f for f in files]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    files = sorted(p for p in d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {d}")
    return files


class CheckpointReader:
    """Every tensor of a (sharded) safetensors checkpoint directory, read one at a time."""

    def __init__(self, directory: str | os.PathLike, files: list[Path] | None = None):
        self.directory = Path(directory)
        self.readers = [SafetensorsReader(p) for p in (files or checkpoint_files(directory))]
        self.where: dict[str, SafetensorsReader] = {}
        for r in self.readers:
            for name in r.infos:
                self.where[name] = r

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def info(self, name: str) -> TensorInfo:
        return self.where[name].infos[name]

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get(name)
