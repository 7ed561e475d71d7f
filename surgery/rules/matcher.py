"""Matching rule selectors and role overrides against sites: pure functions, sites in, sites out."""
from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase

from surgery.core.sites import Site
from surgery.errors import RuleFileError
from surgery.rules.schema import RoleOverride, Selector


def _glob_any(patterns: list[str], *values: str) -> bool:
    return any(fnmatchcase(v, p) for p in patterns for v in values)


def selector_matches(selector: Selector, site: Site) -> bool:
    """True if `site` satisfies every field the selector sets."""
    if selector.roles is not None and not site.roles.intersection(selector.roles):
        return False
    if selector.kinds is not None and site.kind not in selector.kinds:
        return False
    if selector.paths is not None and not _glob_any(selector.paths, site.path):
        return False
    if selector.classes is not None:
        short = site.module_class.rsplit(".", 1)[-1]
        if not _glob_any(selector.classes, site.module_class, short):
            return False
    return True


def apply_role_overrides(sites: list[Site], overrides: list[RoleOverride], source: str) -> list[Site]:
    """Sites with the declared roles added (and their slices set). An override matching no site is an error."""
    sites = list(sites)
    for index, override in enumerate(overrides):
        hits = [i for i, s in enumerate(sites) if fnmatchcase(s.path, override.path) and s.kind != "attention"]
        if not hits:
            raise RuleFileError(source, f"role override {index}: path {override.path!r} matches no linear or embedding site")
        for i in hits:
            site = sites[i]
            slices = dict(site.slices)
            if override.slices is not None:
                end = max(stop for _, stop in override.slices)
                if site.out_features is not None and end > site.out_features:
                    raise RuleFileError(source, f"role override {index}: slice end {end} exceeds the "
                                                f"{site.out_features} output features of {site.path!r}")
                slices[override.role] = tuple(override.slices)
            else:
                slices.pop(override.role, None)
            sites[i] = dataclasses.replace(site, roles=site.roles | {override.role}, slices=slices)
    return sites
