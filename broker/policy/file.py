"""Reading and validating a policy file (TOML).

Every problem is reported, each as "FILE: KEY.PATH: what is wrong", so one edit fixes them
all. Paths inside the policy (key files, JWKS files) are relative to the policy file.

    [accounts.ci-orchestrator]
    roles = ["orchestrator"]
    scopes = ["acme/*/*"]
    certificate_sans = ["spiffe://acme.example/ci/orchestrator"]
    permissions = { artifacts = "read" }
    keys = [{ kid = "2026-01", file = "keys/ci-orchestrator.pub.pem" }]

    # Tokens for these audiences (exact, or a prefix ending in "*") are signed with RS256;
    # every other audience gets the broker's default algorithm (--signing-alg, ES256).
    [audiences."sts.amazonaws.com"]
    algorithm = "RS256"
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from broker.auth import publickeys
from broker.identity import BROKER
from broker.policy.federation import parse_federation
from broker.policy.model import (
    ACCOUNT_NAME_PATTERN,
    DEFAULT_MAX_CHAIN_DEPTH,
    TOKEN_ALGORITHMS,
    WILDCARD,
    AccountKey,
    AudienceRule,
    BindingRequirements,
    ChildRuns,
    Delegation,
    IdentityProvider,
    Policy,
    Role,
    Scope,
    ServiceAccount,
)
from broker.runs.issuance import AUDIENCE_PATTERN
from broker.runs.permissions import (
    DEFAULT_LADDER,
    LADDERS,
    RESOURCE_PATTERN,
    PermissionSet,
    ladder_for,
)

MAX_CHAIN_DEPTH = 16
# Key files and JWKS files are small; a policy naming something huge (or endless) is a mistake.
MAX_REFERENCED_FILE_BYTES = 1024 * 1024
SCOPED_ROLES = (Role.ORCHESTRATOR, Role.DELEGATOR, Role.AUDITOR, Role.VERIFIER)
TOP_KEYS = ("version", "accounts", "federation", "binding", "audiences")
AUDIENCE_KEYS = ("algorithm",)
ACCOUNT_KEYS = (
    "roles",
    "scopes",
    "keys",
    "certificate_sans",
    "permissions",
    "delegation",
    "require_binding",
)
BINDING_KEYS = ("audiences", "levels")
KEY_KEYS = ("kid", "pem", "jwk", "file")
DELEGATION_KEYS = (
    "identity_providers",
    "user_domains",
    "asserted_identities",
    "asserted_domains",
    "max_chain_depth",
    "child_runs",
)
IDP_KEYS = ("issuer", "audience", "jwks_file", "jwks_url")


class PolicyError(Exception):
    """The policy file is unreadable or invalid; `problems` says where and why."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        lines = "\n".join(f"  {source}: {p}" for p in problems)
        super().__init__(f"invalid policy {source}:\n{lines}")


def load_policy(path: Path) -> Policy:
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(raw.decode())
    except UnicodeDecodeError:
        raise PolicyError(source, ["not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(source, [f"not valid TOML: {exc}"]) from None
    parser = _Parser(path.parent)
    policy = parser.policy(data, source, hashlib.sha256(raw).hexdigest())
    if parser.problems:
        raise PolicyError(source, parser.problems)
    return policy


class _Parser:
    """Walks the TOML document, collecting problems instead of stopping at the first."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []

    def problem(self, where: str, text: str) -> None:
        self.problems.append(f"{where}: {text}" if where else text)

    def known_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problem(
                    _join(where, key),
                    f"unknown key{hint}; expected one of: {', '.join(allowed)}",
                )

    def policy(self, data: Mapping[str, Any], source: str, sha256: str) -> Policy:
        self.known_keys(data, TOP_KEYS, "")
        if data.get("version", 1) != 1:
            self.problem("version", "must be 1 (the only policy format so far)")
        accounts_table = data.get("accounts")
        if not isinstance(accounts_table, dict) or not accounts_table:
            self.problem("accounts", "required: at least one [accounts.NAME] table")
            accounts_table = {}
        accounts: dict[str, ServiceAccount] = {}
        for name, table in accounts_table.items():
            account = self.account(name, table, f"accounts.{name}")
            if account is not None:
                accounts[name] = account
        by_san = self.san_index(accounts)
        federation = parse_federation(data.get("federation", {}), accounts, self)
        binding = self.binding(data.get("binding", {}), "binding")
        audiences = self.audiences(data.get("audiences", {}), "audiences")
        return Policy(
            MappingProxyType(accounts),
            source,
            sha256,
            MappingProxyType(by_san),
            federation=federation,
            binding=binding,
            audiences=audiences,
        )

    def binding(self, table: Any, where: str) -> BindingRequirements:
        """`[binding]`: which step tokens must be sender-constrained."""
        if not isinstance(table, dict):
            self.problem(where, "must be a table")
            return BindingRequirements()
        self.known_keys(table, BINDING_KEYS, where)
        audiences = self.strings(table.get("audiences", []), _join(where, "audiences"))
        levels = self.strings(table.get("levels", []), _join(where, "levels"))
        known = {level for ladder in LADDERS.values() for level in ladder} | set(DEFAULT_LADDER)
        for i, level in enumerate(levels):
            if level not in known or level == "none":
                self.problem(
                    f"{where}.levels[{i}]",
                    f"unknown level {level!r} (known: {', '.join(sorted(known - {'none'}))})",
                )
        return BindingRequirements(frozenset(audiences), frozenset(levels))

    def audiences(self, table: Any, where: str) -> tuple[AudienceRule, ...]:
        if not isinstance(table, dict):
            self.problem(where, '[audiences."AUDIENCE"] tables, e.g. algorithm = "RS256"')
            return ()
        rules = []
        for pattern, entry in table.items():
            at = f'{where}."{pattern}"'
            star = pattern.find(WILDCARD)
            if not AUDIENCE_PATTERN.match(pattern) or star not in (-1, len(pattern) - 1):
                self.problem(
                    at,
                    "an audience is 1-256 printable characters without spaces; '*' only at "
                    "the end, as a prefix match",
                )
                continue
            if not isinstance(entry, dict):
                self.problem(at, 'must be a table, e.g. { algorithm = "RS256" }')
                continue
            self.known_keys(entry, AUDIENCE_KEYS, at)
            algorithm = entry.get("algorithm")
            if algorithm not in TOKEN_ALGORITHMS:
                self.problem(
                    _join(at, "algorithm"), f"must be one of {', '.join(TOKEN_ALGORITHMS)}"
                )
                continue
            rules.append(AudienceRule(pattern, algorithm))
        # Exact audiences before prefixes, longer prefixes before shorter ones.
        rules.sort(key=lambda r: (r.pattern.endswith(WILDCARD), -len(r.pattern)))
        return tuple(rules)

    def account(self, name: str, table: Any, where: str) -> ServiceAccount | None:
        if not ACCOUNT_NAME_PATTERN.match(name):
            self.problem(where, "account names are 1-128 letters, digits, '.', '_', '@' or '-'")
        if name == BROKER.name:
            self.problem(where, f"{name!r} is reserved for the broker itself")
        if not isinstance(table, dict):
            self.problem(where, "must be a table")
            return None
        self.known_keys(table, ACCOUNT_KEYS, where)
        roles = self.roles(table.get("roles"), _join(where, "roles"))
        scopes = self.scopes(table.get("scopes", []), _join(where, "scopes"))
        needs_scope = [r.value for r in SCOPED_ROLES if r in roles]
        if needs_scope and not scopes:
            self.problem(
                _join(where, "scopes"),
                f"required for role {needs_scope[0]}: which ORG/PROJECT/PIPELINE it acts on",
            )
        keys = self.keys(table.get("keys", []), _join(where, "keys"))
        sans = self.strings(table.get("certificate_sans", []), _join(where, "certificate_sans"))
        # An account whose keys are all invalid already has those problems reported.
        if not keys and not sans and not table.get("keys"):
            self.problem(
                where, "needs 'keys' or 'certificate_sans': otherwise it can never authenticate"
            )
        delegation = Delegation()
        if "delegation" in table:
            if Role.DELEGATOR not in roles:
                self.problem(_join(where, "delegation"), "only accounts with role delegator")
            delegation = self.delegation(table["delegation"], _join(where, "delegation"))
        return ServiceAccount(
            name=name,
            roles=frozenset(roles),
            scopes=tuple(scopes),
            keys=tuple(keys),
            certificate_sans=frozenset(sans),
            permissions=self.permissions(table.get("permissions", {}), _join(where, "permissions")),
            delegation=delegation,
            require_binding=self.flag(table, "require_binding", where),
        )

    def flag(self, table: Mapping[str, Any], key: str, where: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            self.problem(_join(where, key), "must be true or false")
            return False
        return value

    def strings(self, value: Any, where: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problem(where, "must be a list of non-empty strings")
            return []
        return list(value)

    def roles(self, value: Any, where: str) -> set[Role]:
        if value is None:
            self.problem(where, "required: a list of roles")
            return set()
        roles = set()
        known = ", ".join(r.value for r in Role)
        for i, text in enumerate(self.strings(value, where)):
            try:
                roles.add(Role(text))
            except ValueError:
                self.problem(f"{where}[{i}]", f"unknown role {text!r} (known: {known})")
        if not roles and isinstance(value, list) and not value:
            self.problem(where, "must name at least one role")
        return roles

    def scopes(self, value: Any, where: str) -> list[Scope]:
        scopes = []
        for i, text in enumerate(self.strings(value, where)):
            try:
                scopes.append(Scope.parse(text))
            except ValueError as exc:
                self.problem(f"{where}[{i}]", str(exc))
        return scopes

    def keys(self, value: Any, where: str) -> list[AccountKey]:
        if not isinstance(value, list):
            self.problem(where, 'must be a list of tables, e.g. [{ file = "key.pub.pem" }]')
            return []
        keys: list[AccountKey] = []
        for i, table in enumerate(value):
            key = self.key(table, f"{where}[{i}]")
            if key is None:
                continue
            if key.kid and any(k.kid == key.kid for k in keys):
                self.problem(f"{where}[{i}].kid", f"{key.kid!r} is used twice")
            keys.append(key)
        return keys

    def key(self, table: Any, where: str) -> AccountKey | None:
        if not isinstance(table, dict):
            self.problem(where, "must be a table with one of pem, jwk or file")
            return None
        self.known_keys(table, KEY_KEYS, where)
        sources = [k for k in ("pem", "jwk", "file") if k in table]
        if len(sources) != 1:
            self.problem(where, "give exactly one of pem, jwk or file")
            return None
        kind = sources[0]
        try:
            public_key, kid = self.key_material(kind, table[kind])
            alg = publickeys.algorithm_for(public_key)
        except publickeys.KeyProblem as exc:
            self.problem(_join(where, kind), str(exc))
            return None
        kid = table.get("kid", kid)
        if not isinstance(kid, str):
            self.problem(_join(where, "kid"), "must be a string")
            return None
        return AccountKey(kid, alg, public_key, publickeys.thumbprint(public_key))

    def key_material(self, kind: str, value: Any) -> tuple[Any, str]:
        """The public key and its kid from a key's pem, jwk or file; KeyProblem says why not."""
        if kind == "jwk":
            if not isinstance(value, dict):
                raise publickeys.KeyProblem("must be a table of JWK members (kty, crv, x, y, ...)")
            return publickeys.from_jwk(value)
        if not isinstance(value, str) or not value:
            raise publickeys.KeyProblem("must be a non-empty string")
        if kind == "pem":
            return publickeys.from_pem(value), ""
        text = self.read(value)
        try:
            return publickeys.from_text(text)
        except publickeys.KeyProblem as exc:
            raise publickeys.KeyProblem(f"{self.base_dir / value}: {exc}") from None

    def read(self, relative: str) -> str:
        """A file the policy names, relative to it; bounded (a policy may name /dev/zero)."""
        path = self.base_dir / relative
        try:
            with path.open("rb") as file:
                data = file.read(MAX_REFERENCED_FILE_BYTES + 1)
            if len(data) > MAX_REFERENCED_FILE_BYTES:
                raise publickeys.KeyProblem(
                    f"{path} is larger than {MAX_REFERENCED_FILE_BYTES // 1024} KiB"
                )
            return data.decode()
        except (OSError, UnicodeDecodeError) as exc:
            raise publickeys.KeyProblem(
                f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
            ) from None

    def permissions(self, value: Any, where: str) -> PermissionSet:
        if not isinstance(value, dict):
            self.problem(where, 'must be a table of resource = "level"')
            return PermissionSet.of({})
        valid = {}
        for resource, level in value.items():
            ladder = ladder_for(resource)
            if not RESOURCE_PATTERN.match(resource):
                self.problem(
                    _join(where, resource),
                    "resource names are 1-64 lower-case letters, digits, '.', '_' or '-'",
                )
            elif level not in ladder:
                self.problem(_join(where, resource), f"level must be one of: {', '.join(ladder)}")
            else:
                valid[resource] = level
        return PermissionSet.of(valid)

    def delegation(self, table: Any, where: str) -> Delegation:
        if not isinstance(table, dict):
            self.problem(where, "must be a table")
            return Delegation()
        self.known_keys(table, DELEGATION_KEYS, where)
        providers_value = table.get("identity_providers", [])
        providers = []
        if not isinstance(providers_value, list):
            self.problem(_join(where, "identity_providers"), "must be a list of tables")
        else:
            for i, item in enumerate(providers_value):
                provider = self.identity_provider(item, f"{where}.identity_providers[{i}]")
                if provider is not None:
                    providers.append(provider)
        asserted = table.get("asserted_identities", False)
        if not isinstance(asserted, bool):
            self.problem(_join(where, "asserted_identities"), "must be true or false")
            asserted = False
        asserted_domains = self.domains(
            table.get("asserted_domains", []), _join(where, "asserted_domains")
        )
        if asserted and not asserted_domains:
            self.problem(
                _join(where, "asserted_domains"),
                "required when asserted_identities = true: the email domains it may vouch for",
            )
        if asserted_domains and not asserted:
            self.problem(
                _join(where, "asserted_domains"), "needs asserted_identities = true to take effect"
            )
        depth = table.get("max_chain_depth", DEFAULT_MAX_CHAIN_DEPTH)
        if (
            isinstance(depth, bool)
            or not isinstance(depth, int)
            or not 1 <= depth <= MAX_CHAIN_DEPTH
        ):
            self.problem(
                _join(where, "max_chain_depth"),
                f"must be a whole number from 1 to {MAX_CHAIN_DEPTH}",
            )
            depth = DEFAULT_MAX_CHAIN_DEPTH
        child_runs = table.get("child_runs", ChildRuns.IN_SCOPE.value)
        if not isinstance(child_runs, str) or child_runs not in {c.value for c in ChildRuns}:
            self.problem(
                _join(where, "child_runs"),
                "must be one of " + ", ".join(repr(c.value) for c in ChildRuns),
            )
            child_runs = ChildRuns.IN_SCOPE.value
        return Delegation(
            child_runs=ChildRuns(child_runs),
            identity_providers=tuple(providers),
            user_domains=frozenset(
                self.domains(table.get("user_domains", []), _join(where, "user_domains"))
            ),
            asserted_identities=asserted,
            asserted_domains=frozenset(asserted_domains),
            max_chain_depth=depth,
        )

    def identity_provider(self, table: Any, where: str) -> IdentityProvider | None:
        if not isinstance(table, dict):
            self.problem(where, "must be a table with issuer, audience and jwks_file or jwks_url")
            return None
        self.known_keys(table, IDP_KEYS, where)
        issuer = self.url(table.get("issuer"), _join(where, "issuer"))
        audience = table.get("audience")
        if not isinstance(audience, str) or not audience:
            self.problem(_join(where, "audience"), "required: the client id ID tokens are for")
            audience = ""
        if ("jwks_file" in table) == ("jwks_url" in table):
            self.problem(where, "give exactly one of jwks_file or jwks_url")
            return None
        jwks_url = ""
        jwks_file = ""
        jwks_json = ""
        if "jwks_url" in table:
            jwks_url = self.url(table["jwks_url"], _join(where, "jwks_url"))
        else:
            jwks_file, jwks_json = self.jwks_file(table["jwks_file"], _join(where, "jwks_file"))
        return IdentityProvider(issuer, audience, jwks_file, jwks_url, jwks_json)

    def url(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            self.problem(where, "required: an https:// URL")
            return ""
        try:
            parts = urlsplit(value)
            local = parts.hostname in ("localhost", "127.0.0.1", "::1")
        except ValueError:  # e.g. an unclosed IPv6 bracket
            self.problem(where, f"{value!r} is not a URL")
            return value
        if not parts.netloc or not (parts.scheme == "https" or (parts.scheme == "http" and local)):
            self.problem(where, f"{value!r} must be an https:// URL (http only for localhost)")
        return value

    def jwks_file(self, value: Any, where: str) -> tuple[str, str]:
        if not isinstance(value, str) or not value:
            self.problem(where, "must be a path to a JWKS JSON file")
            return "", ""
        try:
            text = self.read(value)
        except publickeys.KeyProblem as exc:
            self.problem(where, str(exc))
            return value, ""
        try:
            data = json.loads(text)
        except ValueError:
            self.problem(where, "is not JSON")
            return value, ""
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) for k in keys):
            self.problem(where, 'must be a JWKS: {"keys": [ ...at least one JWK... ]}')
        elif any(m in k for k in keys for m in publickeys.PRIVATE_JWK_MEMBERS):
            self.problem(where, "holds a private or symmetric key; a JWKS here is public keys only")
        return str(self.base_dir / value), json.dumps(data, sort_keys=True)

    def domains(self, value: Any, where: str) -> list[str]:
        domains = []
        for i, text in enumerate(self.strings(value, where)):
            domain = text.lower()
            if domain != WILDCARD and not _is_domain(domain):
                self.problem(f"{where}[{i}]", f"{text!r} is not a domain name like example.com")
            domains.append(domain)
        return domains

    def san_index(self, accounts: Mapping[str, ServiceAccount]) -> dict[str, str]:
        owners: dict[str, str] = {}
        for name, account in accounts.items():
            for san in sorted(account.certificate_sans):
                if san in owners:
                    self.problem(
                        f"accounts.{name}.certificate_sans",
                        f"{san!r} is already mapped to account {owners[san]!r}",
                    )
                owners.setdefault(san, name)
        return owners


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _is_domain(text: str) -> bool:
    labels = text.split(".")
    return len(labels) >= 2 and all(
        0 < len(label) <= 63
        and label.replace("-", "").isalnum()
        and label.isascii()
        and not label.startswith("-")
        and not label.endswith("-")
        for label in labels
    )
