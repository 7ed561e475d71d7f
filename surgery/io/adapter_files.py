"""Adapters as files: `surgery.save` / `surgery.load`. Only safetensors and JSON; nothing is unpickled.

A surgery adapter directory holds `adapter_model.safetensors` (the branches' tensors, keyed `<site path>.<name>`)
and `surgery_adapter.json` (the rule set, each placement's method and params, the package version, a
fingerprint of the base model and the SHA-256 of the tensor file), with a model card (`README.md`, see
`model_card.py`). Other formats (HF PEFT) come from plugins through the `surgery_adapter_formats` hook; where such a
directory holds a `surgery_manifest.json` (`manifest.py`), its checksums are checked before the format reads it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from safetensors.torch import save as save_tensors
from torch import nn

from surgery.core import progress
from surgery.core.method import base_parameter_count
from surgery.core.registry import manager
from surgery.core.version import __version__
from surgery.engine.ledger import Attachment, require_ledger, unwrap
from surgery.engine.passes import attach, detach
from surgery.engine.reading import inspect
from surgery.engine.transaction import check_name, model_lock
from surgery.errors import AdapterFileError, LedgerError, MismatchError, RuleFileError
from surgery.io.atomic import directory_lock, write_directory
from surgery.io.bounded import read_json, read_safetensors
from surgery.io.manifest import check_manifest
from surgery.io.model_card import with_model_card
from surgery.rules.plan import Placement, Plan, plan_sites
from surgery.rules.schema import RuleSet, parse_ruleset

TENSORS = "adapter_model.safetensors"
CONFIG = "surgery_adapter.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SavedSite(_Strict):
    path: str
    kind: str
    in_features: int | None
    out_features: int | None
    dtype: str | None


class SavedPlacement(_Strict):
    site: SavedSite
    method: str
    params: dict[str, Any]
    roles: list[str]


class Fingerprint(_Strict):
    model_class: str
    config_hash: str | None


class AdapterConfig(_Strict):
    """The JSON config of a surgery adapter directory."""

    format: Literal["surgery-adapter"] = "surgery-adapter"
    format_version: Literal[1] = 1
    surgery_version: str
    name: str
    ruleset: dict[str, Any]

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        try:
            return check_name(name)
        except LedgerError as err:
            raise ValueError(str(err)) from None
    fingerprint: Fingerprint
    placements: list[SavedPlacement]
    tensors_sha256: str


def config_hash(model: nn.Module) -> str | None:
    """A hash of the model's HF config, without keys that do not change the architecture."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    data = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in
            ("transformers_version", "torch_dtype", "dtype", "architectures", "name_or_path", "use_cache")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).replace("torch.", "") if dtype is not None else None


def _saved_placement(p: Placement) -> SavedPlacement:
    s = p.site
    return SavedPlacement(site=SavedSite(path=s.path, kind=s.kind, in_features=s.in_features, out_features=s.out_features,
                                         dtype=_dtype_name(s.dtype)),
                          method=p.method, params=p.params.model_dump(), roles=sorted(p.roles))


def branch_tensors(attachment: Attachment) -> dict[str, torch.Tensor]:
    """Every branch tensor of an attachment, keyed `<site path>.<state_dict key>`, as standalone CPU tensors."""
    items = [(f"{path}.{key}", t) for path, branch in attachment.branches.items()
             for key, t in branch.state_dict().items()]
    tensors = {}
    with progress.task("saving adapter", len(items), "tensors") as bar:
        for key, t in items:
            tensors[key] = t.detach().to("cpu").clone().contiguous()
            bar.advance()
    return tensors


@contextmanager
def whole_tensors(attachment: Attachment) -> Iterator[bool]:
    """Within the block, every sharded branch tensor (a `DTensor`, as FSDP2's `fully_shard` leaves them) is replaced
    by the whole tensor, gathered from every rank, and put back afterwards. Yields True if anything was gathered: a
    collective, so every rank of the group must enter the block."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        yield False
        return
    from torch.distributed.tensor import DTensor
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for branch in attachment.branches.values():
            for module in branch.modules():
                for table in (module._parameters, module._buffers):
                    for key, t in table.items():
                        if isinstance(t, DTensor):
                            whole = t.full_tensor().detach()
                            table[key] = nn.Parameter(whole, t.requires_grad) if isinstance(t, nn.Parameter) else whole
                            swapped.append((table, key, t))
        yield bool(swapped)
    finally:
        for table, key, t in reversed(swapped):
            table[key] = t


def save(model: nn.Module, directory: str | Path, name: str = "default", format: str = "surgery") -> Path | None:
    """Write attachment `name` (only the adapter) to `directory`. `format`: "surgery" (this package's own) or
    an adapter format that a plugin provides, e.g. "peft" (loadable by HF PEFT). Only the adapter's own files
    are written (the tensors, the config, the model card `README.md` and, for PEFT, the manifest), each
    atomically, the config last; anything else in the directory is left alone (see `surgery.io.atomic`).

    Distributed: with plain tensors on each rank (DDP), call it from one rank. With sharded tensors (FSDP2), call it
    from every rank: the shards are gathered and rank 0 writes the directory; the other ranks return None."""
    model = unwrap(model)
    directory = Path(directory)
    with model_lock(model):
        attachment = require_ledger(model).get(name)
        with whole_tensors(attachment) as gathered:
            if gathered and torch.distributed.get_rank() != 0:
                return None
            if format != "surgery":
                return manager().adapter_format(format).save(model, attachment, directory)
            files = _files(model, attachment, directory, name)
    return write_directory(directory, files)


def _files(model: nn.Module, attachment: Attachment, directory: Path, name: str) -> dict[str, bytes]:
    """The files of a surgery-format save, in the order they are renamed in: the config last (it names the
    tensor file's checksum)."""
    tensors = branch_tensors(attachment)
    blob = save_tensors(tensors, metadata={"format": "pt", "producer": "surgery"})
    config = AdapterConfig(surgery_version=__version__, name=name,
                           ruleset=attachment.plan.ruleset.model_dump(mode="json"),
                           fingerprint=Fingerprint(model_class=require_ledger(model).report.model_class,
                                                   config_hash=config_hash(model)),
                           placements=[_saved_placement(p) for p in attachment.plan.placements],
                           tensors_sha256=hashlib.sha256(blob).hexdigest())
    text = json.dumps(config.model_dump(mode="json"), indent=1) + "\n"
    files = with_model_card({TENSORS: blob}, model, attachment, directory, "surgery")
    files[CONFIG] = text.encode()
    return files


def read_config(directory: Path) -> AdapterConfig:
    path = directory / CONFIG
    data = read_json(path)
    try:
        return AdapterConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise AdapterFileError(f"{path}: field '{'.'.join(map(str, first['loc']))}': {first['msg']}") from None


def read_tensors(path: Path, sha256: str | None = None, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file, checking its SHA-256 if given. Truncated or altered files are refused, and so
    is anything that is not a regular file, or that holds more than `max_bytes` of tensor data (if given)."""
    return read_safetensors(path, sha256, max_bytes, checksum_source=CONFIG)


def max_adapter_bytes(plan: Plan) -> int:
    """The most tensor data an adapter with this plan can hold: 8 bytes for each of its parameters, plus 1 MiB."""
    return 8 * plan.trainable + (1 << 20)


def _site_mismatches(saved: list[SavedPlacement], planned: list[Placement], strict_dtype: bool) -> list[str]:
    found = {p.site.path: p for p in planned}
    problems = []
    for s in saved:
        p = found.pop(s.site.path, None)
        if p is None:
            problems.append(f"missing site {s.site.path!r} ({s.site.kind}, {s.method})")
            continue
        now = _saved_placement(p).site
        for field in ("kind", "in_features", "out_features") + (("dtype",) if strict_dtype else ()):
            if getattr(now, field) != getattr(s.site, field):
                problems.append(f"site {s.site.path!r}: {field} is {getattr(now, field)} here, {getattr(s.site, field)} in the adapter")
        if p.method != s.method or sorted(p.roles) != s.roles:
            problems.append(f"site {s.site.path!r}: the rule set places {p.method} on {sorted(p.roles) or 'the whole module'} here, "
                            f"{s.method} on {s.roles or 'the whole module'} in the adapter")
    problems += [f"site {path!r} is selected here but not in the adapter" for path in found]
    return problems


def _all_optional(ruleset: RuleSet) -> RuleSet:
    """The rule set with every rule optional: to list every site that is missing instead of stopping at the first
    rule that matches nothing."""
    copy = ruleset.model_copy(update={"rules": [r.model_copy(update={"optional": True}) for r in ruleset.rules]})
    copy._source = ruleset.source
    return copy


def load(model: nn.Module, directory: str | Path, name: str | None = None, *, strict_dtype: bool = True) -> Attachment:
    """Attach the adapter saved in `directory` (a surgery adapter, or a format a plugin reads, e.g. HF PEFT)
    under `name` (default: the saved name). A model that does not fit is refused with every mismatch listed,
    and the model is left as it was. With `strict_dtype=False`, tensors are cast to the model's dtypes. Files
    are read in bounded time and memory, and only regular ones (see `surgery.io.bounded`)."""
    model = unwrap(model)
    directory = Path(directory)
    if name is not None:
        check_name(name)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: no such adapter directory")
    with model_lock(model), directory_lock(directory, exclusive=False):
        if not (directory / CONFIG).exists() and not (directory / CONFIG).is_symlink():
            for fmt in manager().adapter_formats.values():
                if fmt.detect(directory):
                    check_manifest(directory)
                    return fmt.load(model, directory, name or "default")
            raise AdapterFileError(f"{directory}: neither a surgery adapter ({CONFIG}) nor a format any plugin reads")
        config = read_config(directory)
        ruleset = parse_ruleset(config.ruleset, str(directory / CONFIG))
        name = name or config.name
        report = inspect(model)
        mismatches = []
        if report.model_class != config.fingerprint.model_class:
            mismatches.append(f"model class is {report.model_class}, the adapter was made for {config.fingerprint.model_class}")
        try:
            plan = plan_sites(_all_optional(ruleset), report, base_parameter_count(model))
        except RuleFileError as err:
            mismatches.append(str(err))
            raise MismatchError(str(directory), mismatches) from None
        mismatches += _site_mismatches(config.placements, plan.placements, strict_dtype)
        if mismatches:
            raise MismatchError(str(directory), mismatches)
        tensors = read_tensors(directory / TENSORS, config.tensors_sha256, max_adapter_bytes(plan))
        attachment = attach(model, ruleset, name=name)
        try:
            fill_branches(attachment, tensors, str(directory / TENSORS), strict_dtype)
        except BaseException:
            detach(model, name)
            raise
        return attachment


def fill_branches(attachment: Attachment, tensors: dict[str, torch.Tensor], source: str, strict_dtype: bool = True) -> None:
    """Copy `tensors` (keyed `<site path>.<key>`) into the attachment's branches; every key must match exactly."""
    expected = {f"{path}.{key}": t for path, branch in attachment.branches.items() for key, t in branch.state_dict().items()}
    problems = [f"tensor {k!r} is missing from {source}" for k in expected if k not in tensors]
    problems += [f"{source} has tensor {k!r} that no branch of this model holds" for k in tensors if k not in expected]
    for key, target in expected.items():
        if key in tensors:
            t = tensors[key]
            if t.shape != target.shape:
                problems.append(f"tensor {key!r}: shape {tuple(t.shape)} in the file, {tuple(target.shape)} here")
            elif strict_dtype and t.dtype != target.dtype:
                problems.append(f"tensor {key!r}: dtype {_dtype_name(t.dtype)} in the file, {_dtype_name(target.dtype)} here")
    if problems:
        raise MismatchError(source, problems)
    bad = [k for k in expected if tensors[k].is_floating_point() and not bool(torch.isfinite(tensors[k]).all())]
    if bad:
        raise AdapterFileError(f"{source}: tensor {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} "
                               "holds NaN or infinite values; refused")
    with torch.no_grad(), progress.task("loading adapter", len(expected), "tensors") as bar:
        for key, target in expected.items():
            target.copy_(tensors[key])
            bar.advance()
