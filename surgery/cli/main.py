"""The `surgery` console script: inspect a model's sites, plan a rule set, merge an adapter, list rules and plugins.

Every error is one line `surgery: error: ...` on stderr: exit code 2 for a bad command line, 1 for a failure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import surgery
from surgery.analysis.report import Report
from surgery.cli.models import copy_tokenizer, load_model, quiet_hf_progress, tiny_names
from surgery.cli.output import emit_json, emit_table, terminal_bar
from surgery.core import progress
from surgery.core.registry import manager
from surgery.core.sites import Site
from surgery.errors import SurgeryError
from surgery.rules.plan import Plan
from surgery.rules.schema import builtin_rulesets, json_schema


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"surgery: error: {message} (see '{self.prog} --help')\n")


def _error_lines(text: str) -> str:
    """An error message for the terminal: its first line as one line, and each further line (the items of a
    list, such as an adapter's mismatches) as one indented line of its own."""
    lines = [" ".join(line.split()) for line in str(text).splitlines() if line.strip()] or [""]
    return "\n".join([lines[0], *("  " + line for line in lines[1:])])


# ---- inspect ------------------------------------------------------------------------------------------------


def site_record(site: Site) -> dict[str, Any]:
    """A site as plain JSON data."""
    record: dict[str, Any] = {
        "path": site.path, "kind": site.kind, "class": site.module_class, "in_features": site.in_features,
        "out_features": site.out_features, "dtype": str(site.dtype).replace("torch.", "") if site.dtype else None,
        "roles": sorted(site.roles), "slices": {r: [list(s) for s in v] for r, v in sorted(site.slices.items())},
        "format": site.format, "attention": None,
    }
    if site.attention is not None:
        record["attention"] = {k: getattr(site.attention, k) for k in site.attention.__dataclass_fields__}
    return record


def _inspect(args: argparse.Namespace) -> int:
    report: Report = surgery.inspect(load_model(args.model, weights=False))
    if args.json:
        emit_json({"model": args.model, "model_class": report.model_class,
                   "sites": [site_record(s) for s in report.sites], "unknown": report.unknown})
        return 0
    notes = [f"{len(report.sites)} sites in {report.model_class}"]
    if report.unknown:
        notes.append(f"linear-like but no weight format (not adaptable): {', '.join(report.unknown)}")
    emit_table(["site", "kind", "shape", "dtype", "roles"], report.rows(), notes)
    return 0


# ---- plan ---------------------------------------------------------------------------------------------------


def _plan(args: argparse.Namespace) -> int:
    plan: Plan = surgery.plan(load_model(args.model, weights=False), args.rules)
    share = 100.0 * plan.trainable / max(plan.total_parameters, 1)
    if args.json:
        emit_json({
            "model": args.model, "rule_set": plan.ruleset.name, "source": plan.ruleset.source,
            "placements": [{"site": p.site.path, "kind": p.site.kind, "method": p.method, "roles": sorted(p.roles),
                            "params": p.params.model_dump(mode="json"), "rule": p.rule, "trainable": p.trainable}
                           for p in plan.placements],
            "trainable": plan.trainable, "total_parameters": plan.total_parameters, "trainable_percent": share})
        return 0
    source = "" if args.rules == plan.ruleset.name else f" from {plan.ruleset.source}"
    rows = []
    for p in plan.placements:
        params = ", ".join(f"{k}={v}" for k, v in p.params.model_dump().items() if v is not None)
        rows.append([p.site.path, p.site.kind, ", ".join(sorted(p.roles)) or "(whole)", p.method, params,
                     f"{p.trainable:,}"])
    emit_table(["site", "kind", "roles", "method", "params", "trainable"], rows,
               [f"rule set {plan.ruleset.name!r}{source}: {len(plan.placements)} placements",
                f"new trainable parameters: {plan.trainable:,} "
                f"({share:.2f}% of the model's {plan.total_parameters:,})"],
               right=["trainable"])
    return 0


# ---- merge --------------------------------------------------------------------------------------------------


def _merge(args: argparse.Namespace) -> int:
    if not (hasattr(surgery, "load") and hasattr(surgery, "bake")):
        raise SurgeryError("this installation of surgery cannot load adapters yet (no surgery.load / surgery.bake)")
    adapter, out = Path(args.adapter).expanduser(), Path(args.out).expanduser()
    if not adapter.is_dir():
        raise SurgeryError(f"{args.adapter}: no such adapter directory")
    if Path(args.model).expanduser().is_dir() and out.resolve() == Path(args.model).expanduser().resolve():
        raise SurgeryError(f"{args.out}: is the base model directory; write the merged model somewhere else")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise SurgeryError(f"{args.out}: exists and is not an empty directory (--force writes into it)")
    with quiet_hf_progress():
        with progress.task("loading model", 1) as bar:
            model = load_model(args.model, weights=True)
            bar.advance()
        attachment = surgery.load(model, adapter, name=args.name)  # counts sites analysed, tensors loaded
        placements = list(attachment.plan.placements)
        reports = surgery.bake(model, attachment.name)  # counts sites merged
        with progress.task("writing model", 1) as bar:
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out)
            copied = copy_tokenizer(args.model, out)
            bar.advance()
    methods = ", ".join(sorted({p.method for p in placements}))
    print(f"merged adapter {attachment.name!r} ({methods} on {len(placements)} sites) into {args.model}; "
          f"wrote {out}" + (f" (with {', '.join(copied)})" if copied else ""))
    for path, numbers in (reports or {}).items():
        print(f"  {path}: " + ", ".join(f"{k}={v:.3g}" for k, v in numbers.items()))
    return 0


# ---- rules, plugins -----------------------------------------------------------------------------------------


def _rules(args: argparse.Namespace) -> int:
    if args.schema:
        emit_json(json_schema())
        return 0
    owners = manager().rule_dir_owners
    records = [{"name": name, "description": rs.description,
                "methods": sorted({r.method for r in rs.rules}), "rules": len(rs.rules),
                "plugin": owners.get(Path(rs.source).resolve().parent, "?"), "source": rs.source}
               for name, rs in sorted(builtin_rulesets().items())]
    if args.json:
        emit_json(records)
        return 0
    emit_table(["rule set", "description", "methods", "plugin"],
               [[r["name"], r["description"], ", ".join(r["methods"]), r["plugin"]] for r in records],
               [f"{len(records)} rule sets; use one with: surgery plan MODEL --rules NAME"])
    return 0


def _plugins(args: argparse.Namespace) -> int:
    registry = manager()
    objects = dict(registry.pm.list_name_plugin())
    rule_sets: dict[str, list[str]] = {}
    owners = manager().rule_dir_owners
    for name, rs in builtin_rulesets().items():
        rule_sets.setdefault(owners.get(Path(rs.source).resolve().parent, "?"), []).append(name)
    records = []
    for name, methods, formats in registry.plugins():
        plugin = objects.get(name)
        records.append({
            "name": name, "module": getattr(plugin, "__name__", type(plugin).__name__),
            "methods": [{"name": m, "kinds": sorted(registry.methods[m].kinds),
                         "mergeable": registry.methods[m].mergeable,
                         "params": registry.methods[m].params.model_json_schema().get("properties", {})}
                        for m in methods],
            "formats": formats, "rule_sets": sorted(rule_sets.get(name, []))})
    if args.json:
        emit_json(records)
        return 0
    rows = [[r["name"], r["module"], ", ".join(m["name"] for m in r["methods"]), ", ".join(r["formats"]),
             ", ".join(r["rule_sets"])] for r in records]
    emit_table(["plugin", "module", "methods", "formats", "rule sets"], rows,
               [f"{len(records)} plugins, {len(registry.methods)} methods, {len(registry.formats)} weight formats"])
    return 0


# ---- the command line ---------------------------------------------------------------------------------------

_MODEL_HELP = "a local Hugging Face model directory, or a built-in tiny model: " + ", ".join(tiny_names())


def build_parser() -> argparse.ArgumentParser:
    """The `surgery` argument parser, with one sub-command per job."""
    parser = _Parser(prog="surgery", description="Parameter-efficient fine-tuning by model surgery: see which "
                     "sites a model has, what a rule set would do, and merge adapters.")
    parser.add_argument("--version", action="version", version=f"surgery {surgery.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars (they are drawn on a terminal "
                        "only, on stderr)")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str, epilog: str,
                json_help: str | None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=epilog, parents=[common],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        if json_help:
            sub.add_argument("--json", action="store_true", help=json_help)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("inspect", _inspect, "show the sites of a model and the roles read from its graph",
                  "example: surgery inspect tiny-llama", "print the sites as JSON")
    sub.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    sub = command("plan", _plan, "show what a rule set would do to a model (changes nothing)",
                  "example: surgery plan tiny-gpt2 --rules lora-qv", "print the plan as JSON")
    sub.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    sub.add_argument("--rules", required=True, metavar="FILE", help="a rule file (YAML) or a rule-set name "
                     "(see 'surgery rules')")
    sub = command("merge", _merge, "merge an adapter into a model and write a plain model directory",
                  "example: surgery merge ./base ./my-adapter --out ./merged\n"
                  "The output loads with transformers' from_pretrained; tokenizer files are copied along.", None)
    sub.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    sub.add_argument("adapter", metavar="ADAPTER_DIR", help="a surgery adapter directory or an HF PEFT adapter directory")
    sub.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model")
    sub.add_argument("--name", default=None, help="which adapter of ADAPTER_DIR to merge (default: the one it holds)")
    sub.add_argument("--force", action="store_true", help="write into DIR even if it is not empty")
    sub = command("rules", _rules, "list the rule sets the installed plugins provide", "example: surgery rules",
                  "print the rule sets as JSON")
    sub.add_argument("--schema", action="store_true", help="print the JSON schema of rule files instead")
    command("plugins", _plugins, "list the installed plugins with their methods, weight formats and rule sets",
            "example: surgery plugins", "print the plugins as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `surgery` command line on `argv` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and command-line errors
        return stop.code if isinstance(stop.code, int) else 2
    try:
        with progress.reporting(terminal_bar(args.quiet)):
            return args.handler(args)
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 -- the one place that turns any failure into one line
        if args.debug:
            raise
        if isinstance(err, (SurgeryError, OSError)):  # surgery's own messages: a list keeps one item a line
            message = _error_lines(str(err))
        else:
            message = " ".join(f"unexpected {type(err).__name__}: {err} (--debug shows the traceback)".split())
        print(f"surgery: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
