"""Permissions: a resource mapped to an access level, and the rules for narrowing them.

Levels form a ladder per resource. Most resources use the default ladder
none < read < write < admin; a few insert their own rungs (pipelines can be executed without
being edited). A request is within a ceiling when every requested level is at or below the
ceiling's level for that resource.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from broker import limits
from broker.errors import FieldViolation, InvalidArgument

DEFAULT_LADDER: tuple[str, ...] = ("none", "read", "write", "admin")
LADDERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "pipelines": ("none", "read", "execute", "write", "admin"),
        "deployments": ("none", "read", "approve", "write", "admin"),
    }
)
RESOURCE_PATTERN = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
MAX_PERMISSIONS = limits.MAX_PERMISSIONS


def ladder_for(resource: str) -> tuple[str, ...]:
    return LADDERS.get(resource, DEFAULT_LADDER)


def rank(resource: str, level: str) -> int:
    """Position of `level` on the resource's ladder; raises KeyError for unknown levels."""
    try:
        return ladder_for(resource).index(level)
    except ValueError:
        raise KeyError(level) from None


@dataclass(frozen=True)
class PermissionSet:
    """An immutable resource → level mapping. Resources at level "none" are dropped."""

    levels: Mapping[str, str]

    @classmethod
    def of(cls, items: Mapping[str, str]) -> PermissionSet:
        kept = {r: lvl for r, lvl in sorted(items.items()) if lvl != "none"}
        return cls(MappingProxyType(kept))

    @classmethod
    def parse(cls, pairs: Iterable[tuple[str, str]], field: str) -> PermissionSet:
        """Validate (resource, level) pairs from outside; errors name `field[i]`."""
        violations: list[FieldViolation] = []
        seen: dict[str, str] = {}
        for i, (resource, level) in enumerate(pairs):
            where = f"{field}[{i}]"
            if i >= MAX_PERMISSIONS:
                violations.append(FieldViolation(field, f"at most {MAX_PERMISSIONS} entries"))
                break
            if not RESOURCE_PATTERN.match(resource):
                violations.append(
                    FieldViolation(
                        f"{where}.resource",
                        "must be 1-64 lower-case letters, digits, '.', '_' or '-', "
                        "starting with a letter",
                    )
                )
                continue
            if level not in ladder_for(resource):
                allowed = ", ".join(ladder_for(resource))
                violations.append(FieldViolation(f"{where}.level", f"must be one of: {allowed}"))
                continue
            if resource in seen:
                violations.append(FieldViolation(where, f"resource {resource!r} listed twice"))
                continue
            seen[resource] = level
        if violations:
            raise InvalidArgument(violations)
        return cls.of(seen)

    def __bool__(self) -> bool:
        return bool(self.levels)

    def items(self) -> list[tuple[str, str]]:
        return list(self.levels.items())

    def as_dict(self) -> dict[str, str]:
        return dict(self.levels)

    def level_of(self, resource: str) -> str:
        return self.levels.get(resource, "none")

    def excess_over(self, ceiling: PermissionSet) -> list[str]:
        """Each permission of self wider than `ceiling`, as "resource: level (ceiling: x)"."""
        excess = []
        for resource, level in self.levels.items():
            allowed = ceiling.level_of(resource)
            if rank(resource, level) > rank(resource, allowed):
                excess.append(f"{resource}: {level} (ceiling: {allowed})")
        return excess

    def intersect(self, other: PermissionSet) -> PermissionSet:
        """The widest set within both: per resource, the lower of the two levels."""
        result = {}
        for resource, level in self.levels.items():
            theirs = other.level_of(resource)
            result[resource] = min(level, theirs, key=lambda lvl: rank(resource, lvl))
        return PermissionSet.of(result)
