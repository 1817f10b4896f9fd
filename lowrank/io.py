"""Safetensors I/O shared by the adapter checkpoints and the command-line tool: atomic, streaming writes.

:func:`write_safetensors` writes a file tensor by tensor (one tensor in memory at a time) into a temporary
file beside the destination, syncs it and moves it into place (:func:`atomic_write`), so a crash leaves the
previous file intact. Reading goes through ``safetensors.safe_open`` (memory-mapped) where it is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch

__all__ = [
    "DTYPE_FROM_CODE",
    "MAX_HEADER_BYTES",
    "TensorEntry",
    "atomic_write",
    "entries_from_dict",
    "folder_for_write",
    "fsync_directory",
    "write_safetensors",
    "write_safetensors_to",
    "write_temporary",
]

# safetensors dtype codes (https://github.com/huggingface/safetensors, format description).
_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        _DTYPE_CODES[getattr(torch, _name)] = _code
DTYPE_FROM_CODE: dict[str, torch.dtype] = {code: dtype for dtype, code in _DTYPE_CODES.items()}

# The largest JSON header safetensors readers accept (MAX_HEADER_SIZE in the Rust crate, safetensors/src/
# tensor.rs; a guard against hostile headers): a longer one is written fine but never read back.
MAX_HEADER_BYTES = 100_000_000


def fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def folder_for_write(folder: str | os.PathLike):
    """Create ``folder`` (and its missing parents) for a write in the ``with`` block; if the block raises,
    the folders created here are removed again (each only if empty), so a failed write leaves no empty
    folder tree behind. An existing folder and its files are never touched."""
    created = []  # deepest first
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(folder, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new one.

    ``write(f)`` fills a temporary file created in the same directory as ``path``; the file is flushed and
    ``fsync``-ed, then moved over ``path`` with :func:`os.replace` (atomic on POSIX and Windows within one
    file system), and the directory entry is synced. On any exception the temporary file is removed.
    """
    path = os.fspath(path)
    tmp = write_temporary(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def write_temporary(path: str, write: Callable[[IO[bytes]], None]) -> str:
    """Fill a synced temporary file ``.<name>.<random>.tmp`` beside ``path``; return its path."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its name, dtype, shape and a zero-argument function that produces it.

    The producer is called only when the tensor's bytes are written, so a writer holds one tensor at a time.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


def write_safetensors(
    path: str | os.PathLike, entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors to a safetensors file atomically, one tensor in memory at a time.

    Parameters
    ----------
    path : str or PathLike
        Destination file; replaced atomically (see :func:`atomic_write`).
    entries : sequence of TensorEntry
        Tensors in file order. Each produced tensor must match its declared dtype and shape.
    metadata : dict of str to str, optional
        Stored under ``__metadata__``; ``{"format": "pt"}`` is added as transformers expects.

    Raises
    ------
    TypeError
        Metadata keys or values that are not ``str``, tensor names that are not ``str``, a dtype safetensors
        has no code for, a produced value that is not a dense (strided) tensor.
    ValueError
        A duplicate tensor name or the name ``"__metadata__"``, a header (names, shapes, metadata) longer
        than the ``MAX_HEADER_BYTES`` (100 MB) safetensors readers accept, a produced tensor on the meta
        device or of another dtype or shape than declared. The destination is then left as it was.

    Notes
    -----
    The format is an 8-byte little-endian header length, a JSON header mapping each name to its dtype, shape
    and ``[begin, end)`` byte offsets into the data section, padded with spaces to a multiple of 8 bytes, then
    the raw little-endian data. Writing it directly (rather than building the whole file in memory) keeps the
    peak memory at one tensor, which matters for whole-model checkpoints in the command-line tool.
    """
    atomic_write(path, lambda f: write_safetensors_to(f, entries, metadata))


def write_safetensors_to(
    f: IO[bytes], entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None
) -> None:
    """Write the safetensors bytes of ``entries`` to the open binary file ``f``.

    See :func:`write_safetensors` for the format.
    """
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for key, value in (metadata or {}).items():
        # readers (safetensors, transformers) refuse a header whose metadata holds anything but strings
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"metadata must map str to str (safetensors readers refuse other values), got "
                f"{key!r}: {type(value).__name__}"
            )
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry.name, str):
            raise TypeError(f"entries: tensor names must be str, got {entry.name!r}")
        if entry.name == "__metadata__":
            raise ValueError("entries: '__metadata__' is the header's metadata key, not a tensor name")
        if entry.name in seen:
            raise ValueError(f"entries: duplicate tensor name {entry.name!r}")
        seen.add(entry.name)
        if entry.dtype not in _DTYPE_CODES:
            raise TypeError(f"entries: tensor {entry.name!r} has unsupported dtype {entry.dtype}")
        nbytes = torch.Size(entry.shape).numel() * torch.empty((), dtype=entry.dtype).element_size()
        header[entry.name] = {
            "dtype": _DTYPE_CODES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    if len(header_bytes) > MAX_HEADER_BYTES:
        meta_bytes = len(json.dumps(header["__metadata__"], separators=(",", ":")).encode())
        raise ValueError(
            f"the safetensors header would take {len(header_bytes):,} bytes ({meta_bytes:,} of metadata, "
            f"{len(header) - 1:,} tensor entries), over the {MAX_HEADER_BYTES:,} that safetensors readers "
            "accept (they refuse the file: 'header too large'); shorten the metadata or split the tensors "
            "over several files"
        )

    f.write(len(header_bytes).to_bytes(8, "little"))
    f.write(header_bytes)
    for entry in entries:
        tensor = entry.produce()
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            what = type(tensor).__name__ if not isinstance(tensor, torch.Tensor) else str(tensor.layout)
            raise TypeError(f"entries: tensor {entry.name!r} must be a dense (strided) tensor, got {what}")
        if tensor.device.type == "meta":
            raise ValueError(f"entries: tensor {entry.name!r} is on the meta device (it has no data)")
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != tuple(entry.shape):
            raise ValueError(
                f"tensor {entry.name!r}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                f"declared {entry.dtype} {tuple(entry.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            f.write(memoryview(data.view(torch.uint8).numpy()))


def entries_from_dict(tensors: dict[str, torch.Tensor]) -> list[TensorEntry]:
    return [TensorEntry(k, t.dtype, tuple(t.shape), (lambda t=t: t)) for k, t in tensors.items()]
