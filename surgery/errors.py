"""The errors surgery raises. Each names the file, rule, site or key at fault."""
from __future__ import annotations


class SurgeryError(Exception):
    """Base class: anything surgery refuses to do. The model is left as it was."""


class RuleFileError(SurgeryError):
    """A rule file (or RuleSet) is invalid: names the file, the rule index and the field."""

    def __init__(self, source: str, problem: str, rule: int | None = None, field: str | None = None):
        self.source, self.problem, self.rule, self.field = source, problem, rule, field
        where = source
        if rule is not None:
            where += f", rule {rule}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")


class PluginError(SurgeryError):
    """A plugin is missing, clashes with another, or broke its contract."""


class SiteError(SurgeryError):
    """A method cannot be applied to a site (wrong kind, shape, dtype)."""


class LedgerError(SurgeryError):
    """A pass that the ledger refuses: unknown name, attached twice, merged twice, ..."""


class NotMergeableError(SurgeryError):
    """The method has no merge (e.g. bottleneck adapters), or this merge would not be reversible."""


class TraceError(SurgeryError):
    """The model could not be traced for analysis."""


class AnalysisWarning(UserWarning):
    """Something the analysis could not read exactly (it names the module and why); the reading falls back to what
    the graph's structure alone says."""


class AdapterFileError(SurgeryError):
    """An adapter directory that cannot be read: missing, truncated, tampered or malformed. Names the file."""


class MismatchError(SurgeryError):
    """The adapter does not fit this model. `mismatches` lists every difference found."""

    def __init__(self, directory: str, mismatches: list[str]):
        self.mismatches = mismatches
        listing = "\n  - ".join(mismatches)
        super().__init__(f"adapter {directory} does not fit this model ({len(mismatches)} mismatches):\n  - {listing}")


class PatternError(SurgeryError):
    """A regular expression (from a file: e.g. HF PEFT's `alpha_pattern`) outside the subset that can be matched in
    linear time (`surgery.rules.patterns`), or too large to match in bounded time."""
