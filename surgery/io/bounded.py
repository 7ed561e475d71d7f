"""Reading files of an adapter directory that may be hostile, in bounded time and memory.

Only regular files are read (a symlink to `/dev/zero`, a FIFO or a device is refused before a byte is read;
FIFOs are opened non-blocking so the open itself cannot hang). A JSON file is read up to a size limit and
refused if it nests deeper than `JSON_DEPTH`, repeats a key, or spells NaN/Infinity. A safetensors file is read
header first: the header is bounded, must describe tensors that tile the rest of the file exactly, and the data
is read only if it is no larger than what the caller expects (the plan's parameter count says how many bytes
an adapter of this model can hold).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors

from surgery.errors import AdapterFileError

JSON_LIMIT = 16 << 20
"""Largest JSON config read (bytes)."""
JSON_DEPTH = 64
"""Deepest nesting of lists and objects accepted in a JSON config."""
HEADER_LIMIT = 16 << 20
"""Largest safetensors header read (bytes)."""

_ELEMENT_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                 "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class _Reader:
    """An open regular file (checked on the open descriptor, so a swapped path cannot slip a device in)."""

    def __init__(self, path: Path, what: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise AdapterFileError(f"{path}: no such file") from None
        except OSError as err:
            raise AdapterFileError(f"{path}: cannot open the {what} ({err.strerror or err})") from None
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(self.fd)
            kind = "directory" if stat.S_ISDIR(info.st_mode) else "device, FIFO or socket"
            raise AdapterFileError(f"{path}: the {what} is a {kind}, not a regular file; refused")
        self.size = info.st_size

    def read(self, count: int) -> bytes:
        chunks, left = [], count
        while left > 0:
            chunk = os.read(self.fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) != count:
            raise AdapterFileError(f"{self.path}: shorter than its size said ({len(data)} of {count} bytes); it "
                                   "changed while being read")
        return data

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def read_bytes(path: Path, limit: int, what: str = "file") -> bytes:
    """The whole of a regular file of at most `limit` bytes."""
    with _Reader(path, what) as reader:
        if reader.size > limit:
            raise AdapterFileError(f"{path}: the {what} is {reader.size:,} bytes, more than the {limit:,} accepted")
        return reader.read(reader.size)


def sha256_of(path: Path, what: str = "file") -> str:
    """The SHA-256 of a regular file, read in chunks (bounded memory; a device or FIFO is refused unread)."""
    digest = hashlib.sha256()
    with _Reader(path, what) as reader:
        left = reader.size
        while left > 0:
            chunk = reader.read(min(left, 1 << 24))
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _depth(value: Any) -> int:
    """Nesting depth of lists and dicts, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if depth > JSON_DEPTH:
                return depth
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate key {repeated[0]!r}")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: bytes | str, source: str, limit: int = JSON_LIMIT) -> Any:
    """JSON from bytes or text, bounded: size, nesting depth, no duplicate keys, no NaN/Infinity."""
    if len(text) > limit:
        raise AdapterFileError(f"{source}: {len(text):,} bytes of JSON, more than the {limit:,} accepted")
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise AdapterFileError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise AdapterFileError(f"{source}: not readable JSON (nested too deeply)") from None
    except ValueError as err:  # JSONDecodeError, duplicate keys, NaN, integers with too many digits
        raise AdapterFileError(f"{source}: not readable JSON ({err})") from None
    if _depth(data) > JSON_DEPTH:
        raise AdapterFileError(f"{source}: not readable JSON (nested deeper than {JSON_DEPTH} levels)")
    return data


def read_json(path: Path, limit: int = JSON_LIMIT) -> Any:
    """A JSON config file (a regular file of at most `limit` bytes), parsed with `parse_json`'s bounds."""
    return parse_json(read_bytes(path, limit, "JSON file"), str(path), limit)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors file's header says: its tensors and the size of its data."""

    tensors: dict[str, TensorInfo]
    header_bytes: int
    data_bytes: int


def _parse_header(path: Path, reader: _Reader, lenient: bool = False) -> SafetensorsHeader:
    """The header; the file must hold exactly the data it describes (`lenient`: or less, for a caller that
    checks a checksum first and reports a truncated file as such)."""
    if reader.size < 8:
        raise AdapterFileError(f"{path}: not a valid safetensors file (only {reader.size} bytes)")
    length = int.from_bytes(reader.read(8), "little")
    if length > HEADER_LIMIT or 8 + length > reader.size:
        raise AdapterFileError(f"{path}: not a valid safetensors file (its header claims {length:,} bytes, the file "
                               f"has {reader.size:,}; at most {HEADER_LIMIT:,} are accepted)")
    raw = parse_json(reader.read(length), f"{path} (safetensors header)", HEADER_LIMIT)
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path}: not a valid safetensors file (the header is not a JSON object)")
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for key, entry in raw.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = dtype in _ELEMENT_SIZE and all(type(d) is int and d >= 0 for d in shape) and \
                type(start) is int and type(end) is int and 0 <= start <= end
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise AdapterFileError(f"{path}: not a valid safetensors file (tensor {key!r}: bad entry in the header)")
        count = 1
        for d in shape:
            count *= d
        if count * _ELEMENT_SIZE[dtype] != end - start:
            raise AdapterFileError(f"{path}: not a valid safetensors file (tensor {key!r}: {end - start} bytes for "
                                   f"shape {shape} of {dtype})")
        tensors[key] = TensorInfo(dtype, tuple(shape), end - start)
        spans.append((start, end))
    spans.sort()
    position = 0
    for start, end in spans:
        if start != position:
            raise AdapterFileError(f"{path}: not a valid safetensors file (tensor data overlap or leave gaps)")
        position = end
    if 8 + length + position > reader.size and not lenient:
        _size_error(path, position, reader.size - 8 - length)
    if 8 + length + position < reader.size:  # more than the header describes: never read it
        _size_error(path, position, reader.size - 8 - length)
    return SafetensorsHeader(tensors, length, position)


def _size_error(path: Path, described: int, held: int) -> None:
    raise AdapterFileError(f"{path}: not a valid safetensors file (the header describes {described:,} bytes of "
                           f"data, the file holds {held:,}: truncated or with data appended)")


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The header of a safetensors file, checked against the file's size (no tensor data is read)."""
    with _Reader(path, "tensor file") as reader:
        return _parse_header(path, reader)


def read_safetensors(path: Path, sha256: str | None = None, max_bytes: int | None = None,
                     checksum_source: str = "the adapter config") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file: refused if malformed, if its data is larger than `max_bytes`, or if its
    SHA-256 is not `sha256` (when given; `checksum_source` says where that was recorded)."""
    with _Reader(path, "tensor file") as reader:
        if sha256 is not None and reader.size < 8:
            blob = reader.read(reader.size)
            header = None
        else:
            header = _parse_header(path, reader, lenient=sha256 is not None)
            if max_bytes is not None and header.data_bytes > max_bytes:
                raise AdapterFileError(f"{path}: holds {header.data_bytes:,} bytes of tensors, more than the "
                                       f"{max_bytes:,} an adapter of this model and rule set can have; refused")
            os.lseek(reader.fd, 0, os.SEEK_SET)
            blob = reader.read(reader.size)
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise AdapterFileError(f"{path}: contents do not match the SHA-256 recorded in {checksum_source} "
                               "(truncated or altered)")
    if header is None or 8 + header.header_bytes + header.data_bytes != len(blob):
        raise AdapterFileError(f"{path}: not a valid safetensors file (truncated)")
    try:
        return load_tensors(blob)
    except Exception as err:  # safetensors raises its own error types for malformed headers and short files
        raise AdapterFileError(f"{path}: not a valid safetensors file ({err})") from None
