"""Integrity of adapter directories in formats that carry no checksum of their own (HF PEFT's): a manifest file
with the SHA-256 of each tensor file, written by `surgery.save` and checked by `surgery.load` where it exists."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from surgery.core.version import __version__
from surgery.errors import AdapterFileError
from surgery.io.bounded import read_json, sha256_of

MANIFEST = "surgery_manifest.json"
MANIFEST_LIMIT = 1 << 20
"""The largest manifest read (bytes)."""


def with_manifest(files: dict[str, bytes]) -> dict[str, bytes]:
    """`files` (name -> bytes, about to be written together) plus a manifest of every `.safetensors` file's SHA-256."""
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items()) if name.endswith(".safetensors")}
    manifest = {"format": "surgery-manifest", "format_version": 1, "surgery_version": __version__, "sha256": sums}
    return {**files, MANIFEST: (json.dumps(manifest, indent=1) + "\n").encode()}


def check_manifest(directory: Path) -> None:
    """Where `directory` holds a manifest, every file it lists must be there with the recorded SHA-256; otherwise
    an AdapterFileError naming the file. A directory without a manifest passes (as before manifests existed).
    Read bounded, regular files only (see `surgery.io.bounded`)."""
    path = directory / MANIFEST
    if not path.exists() and not path.is_symlink():
        return
    try:
        data = read_json(path, MANIFEST_LIMIT)
    except AdapterFileError as err:
        raise AdapterFileError(f"{path}: not a readable surgery manifest ({err})") from None
    sums = data.get("sha256") if isinstance(data, dict) else None
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise AdapterFileError(f"{path}: not a readable surgery manifest ('sha256' is not a mapping of file names to "
                               "hex digests)")
    for name, expected in sums.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise AdapterFileError(f"{path}: lists {name!r}, which is not a file name in the adapter directory")
        target = directory / name
        if not target.exists() and not target.is_symlink():
            raise AdapterFileError(f"{target}: no such file, but {MANIFEST} lists it")
        if sha256_of(target, "tensor file") != expected:
            raise AdapterFileError(f"{target}: contents do not match the SHA-256 recorded in {MANIFEST} (truncated or "
                                   f"altered); save the adapter again, or delete {MANIFEST} to load it unchecked")
