"""`token-broker policy check FILE`: validate a policy file offline, as the broker would."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from broker.cli import common
from broker.cli.output import Output
from broker.policy.file import PolicyError, load_policy
from broker.policy.model import Policy, ServiceAccount

# A problem reads "KEY.PATH: what is wrong"; problems about the whole file have no key.
_KEYED = re.compile(r"^(?P<key>[A-Za-z0-9_.@\[\]-]+): (?P<problem>.+)$", re.DOTALL)


def add_commands(commands: common.Commands) -> None:
    """Register the `policy` command group."""
    policy = common.add_group(
        commands,
        "policy",
        help="check policy files",
        examples=["token-broker policy check policy.toml"],
    )
    check = common.add_command(
        policy,
        "check",
        _check,
        help="validate a policy file offline; exit 2 when it has problems",
        description="Load and validate a policy file exactly as the broker does at start and "
        "on reload (key files and JWKS files are read relative to it). Prints every problem "
        "as FILE: KEY: PROBLEM and exits 2; prints a summary of its accounts when valid.",
        examples=[
            "token-broker policy check policy.toml",
            "token-broker policy check policy.toml --json | jq '.problems[].key'",
        ],
    )
    check.add_argument("file", type=Path, metavar="FILE")
    common.add_json_flag(check)


def _check(args: argparse.Namespace) -> int:
    out = Output(as_json=args.json)
    try:
        policy = load_policy(args.file)
    except PolicyError as error:
        problems = [_problem(error.source, text) for text in error.problems]
        if out.as_json:
            out.json({"valid": False, "file": error.source, "problems": problems})
        else:
            for problem in problems:
                key = f"{out.paint(problem['key'], 'bold')}: " if problem["key"] else ""
                out.line(f"{problem['file']}: {key}{problem['problem']}")
            count = len(problems)
            out.line(out.paint(f"{count} problem{'s' * (count != 1)}: not a valid policy", "red"))
        return common.EXIT_USAGE
    accounts = [_account_json(a) for a in sorted(policy.accounts.values(), key=_name)]
    subjects = _subjects_json(policy)
    if out.as_json:
        out.json(
            {
                "valid": True,
                "file": str(args.file),
                "sha256": policy.sha256,
                "accounts": accounts,
                "subjects": subjects,
            }
        )
    else:
        _print_summary(out, policy, accounts)
        for subject in subjects:
            out.line(
                f"subject of {subject['for']}: {subject['template']} "
                f"(at most {subject['max_bytes']} bytes)"
            )
    return common.EXIT_OK


def _subjects_json(policy: Policy) -> list[dict[str, Any]]:
    """The subject templates in force, each with whose runs it shapes and its longest form."""
    federation = policy.federation
    named = [
        (f"delegator {name}", template) for name, template in sorted(federation.delegators.items())
    ]
    named += [
        (f"org {org}", claims.subject)
        for org, claims in sorted(federation.orgs.items())
        if claims.subject is not None
    ]
    if federation.default.subject is not None:
        named.append(("every other org", federation.default.subject))
    return [
        {"for": who, "template": template.text, "max_bytes": template.max_bytes()}
        for who, template in named
    ]


def _problem(source: str, text: str) -> dict[str, str]:
    match = _KEYED.match(text)
    if match is None:
        return {"file": source, "key": "", "problem": text}
    return {"file": source, "key": match["key"], "problem": match["problem"]}


def _name(account: ServiceAccount) -> str:
    return account.name


def _account_json(account: ServiceAccount) -> dict[str, Any]:
    delegation = account.delegation
    return {
        "name": account.name,
        "roles": sorted(role.value for role in account.roles),
        "scopes": [str(scope) for scope in account.scopes],
        "keys": [key.kid for key in account.keys],
        "certificate_sans": sorted(account.certificate_sans),
        "permissions": dict(sorted(account.permissions.as_dict().items())),
        "delegation": {
            "identity_providers": [idp.issuer for idp in delegation.identity_providers],
            "user_domains": sorted(delegation.user_domains),
            "asserted_identities": delegation.asserted_identities,
            "asserted_domains": sorted(delegation.asserted_domains),
            "max_chain_depth": delegation.max_chain_depth,
            "child_runs": delegation.child_runs.value,
        },
    }


def _print_summary(out: Output, policy: Policy, accounts: list[dict[str, Any]]) -> None:
    count = len(accounts)
    out.line(out.paint(f"{policy.source}: valid, {count} account{'s' * (count != 1)}", "green"))
    rows = []
    for account in accounts:
        auth = [f"{len(account['keys'])} key(s)"] if account["keys"] else []
        auth += (
            [f"{len(account['certificate_sans'])} SAN(s)"] if account["certificate_sans"] else []
        )
        delegation = account["delegation"]
        acts_for = ""
        if "delegator" in account["roles"]:
            how = [*delegation["identity_providers"]]
            if delegation["asserted_identities"]:
                how.append("asserted")
            acts_for = f"{','.join(delegation['user_domains']) or '-'} via {','.join(how) or '-'}"
        rows.append(
            [
                account["name"],
                ",".join(account["roles"]),
                ",".join(account["scopes"]) or "-",
                " ".join(auth),
                acts_for,
            ]
        )
    out.table(("ACCOUNT", "ROLES", "SCOPES", "AUTHENTICATES WITH", "ACTS FOR"), rows)
