"""`token-broker demo`: the whole story in one command, against a throw-away local broker.

A test identity provider signs alice@example.com's ID token; the `deploy-portal` service
account hands it to ExecuteOnBehalfOf; the broker hands the run to the sample executor, which
mints a step token (`pipelines: read`) with the run credential and calls the sample API, which
verifies it offline; the executor ends the run with RevokeRun; the API now refuses the same
token ("run ended"); the run's audit trail shows both identities; `audit verify` passes.

Everything runs in this process on 127.0.0.1 (ports chosen by the OS), with its data in a
temporary directory, and is stopped and removed at the end. Exit status: 0 when every step
did what it should, 1 otherwise.

With OpenTelemetry's variables set (`OTEL_EXPORTER_OTLP_ENDPOINT`, ...), each part records
its spans as the service it plays — `token-broker-demo` (the portal and the auditor),
`token-broker`, `sample-executor`, `sample-api` — and exports them: the story is one trace,
whose id the demo prints, inside the caller's trace when `TRACEPARENT` is set.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import format_trace_id

from broker.api.server import BrokerServer, create_server
from broker.audit import verify as auditverify
from broker.audit.checkpoints import PublishedKeys
from broker.audit.events import Action
from broker.settings import Settings
from broker.store import StoreRefused, all_checkpoints, all_stored_events
from broker.store.factory import OpenOptions, open_store
from broker.telemetry import logs, setup
from tokenbroker import tracing
from tokenbroker.client import BrokerClient
from tokenbroker.credentials import assertion_credentials
from tokenbroker.defaults import SERVICE_NAME
from tokenbroker.dpop import DPoPKey
from tokenbroker.errors import BrokerError
from tokenbroker.samples.api import ApiAnswer, SampleApi, call_api
from tokenbroker.samples.executor import FINISHED, STEP_PERMISSIONS, Execution, SampleExecutor
from tokenbroker.samples.idp import TestIdentityProvider
from tokenbroker.v1 import types_pb2

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

IDP_ISSUER = "https://idp.example.com"
PORTAL = "deploy-portal"  # the delegator; also the client id its ID tokens are for
PERSON = "alice@example.com"
PIPELINE = ("acme", "web", "deploy")
# Revocations reach the offline-verifying API through the audit stream, a moment later.
REVOCATION_WAIT = 5.0


class StepFailed(Exception):
    """A step did not do what it should; the message says what happened instead."""


@dataclass(frozen=True)
class DemoAccount:
    """A service account of the demo policy, with the private key it signs in with."""

    name: str
    roles: tuple[str, ...]
    scopes: tuple[str, ...]
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def new(cls, name: str, roles: tuple[str, ...], scopes: tuple[str, ...]) -> DemoAccount:
        return cls(name, roles, scopes, ec.generate_private_key(ec.SECP256R1()))

    def credentials(self, audience: str) -> grpc.CallCredentials:
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return assertion_credentials(self.name, pem, audience, key_id=self.name)

    def toml(self) -> str:
        public = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return (
            f"[accounts.{self.name}]\n"
            f"roles = {_toml_list(self.roles)}\n"
            f"scopes = {_toml_list(self.scopes)}\n"
            f'keys = [{{ kid = "{self.name}", pem = """\n{public.decode()}""" }}]\n'
        )


def _toml_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


@dataclass(frozen=True)
class Cast:
    """Who takes part: the IdP and the service accounts of the demo policy."""

    idp: TestIdentityProvider
    portal: DemoAccount  # starts runs for people (delegator)
    api: DemoAccount  # the sample API follows run endings (verifier: no people, no inputs)
    siem: DemoAccount  # reads the run's audit trail at the end (auditor)

    @classmethod
    def new(cls) -> Cast:
        return cls(
            TestIdentityProvider(IDP_ISSUER),
            DemoAccount.new(PORTAL, ("delegator",), ("acme/*/*",)),
            DemoAccount.new("sample-api", ("verifier",), ("*/*/*",)),
            DemoAccount.new("siem", ("auditor",), ("acme/*/*",)),
        )

    def write_policy(self, directory: Path) -> Path:
        """The demo policy: deploy-portal may act for example.com people its IdP verified."""
        self.idp.write_jwks(directory / "idp-jwks.json")
        delegation = (
            f"[accounts.{PORTAL}.delegation]\n"
            'user_domains = ["example.com"]\n'
            f"[[accounts.{PORTAL}.delegation.identity_providers]]\n"
            f'issuer = "{IDP_ISSUER}"\n'
            f'audience = "{PORTAL}"\n'
            'jwks_file = "idp-jwks.json"\n'
        )
        accounts = [self.portal.toml() + delegation, self.api.toml(), self.siem.toml()]
        path = directory / "demo-policy.toml"
        path.write_text("version = 1\n\n" + "\n".join(accounts))
        return path


DEMO_SERVICE = "token-broker-demo"
EXECUTOR_SERVICE = "sample-executor"
API_SERVICE = "sample-api"
ROOT_SPAN = "token-broker demo"


@dataclass
class DemoTelemetry:
    """A tracer provider per part the demo plays, exporting as OTEL_* says; all None when
    nothing is to be exported."""

    environ: Mapping[str, str]
    demo: TracerProvider | None = None  # the portal and the auditor
    broker: TracerProvider | None = None
    executor: TracerProvider | None = None
    api: TracerProvider | None = None
    trace_id: str = field(default="", init=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DemoTelemetry:
        if not setup.exports_traces(environ):
            return cls(environ)
        # Four services in one process: OTEL_SERVICE_NAME can name only the demo's own part.
        parts = {k: v for k, v in environ.items() if k != "OTEL_SERVICE_NAME"}
        telemetry = cls(
            environ,
            setup.tracer_provider_from_env(environ, DEMO_SERVICE),
            setup.tracer_provider_from_env(parts, SERVICE_NAME),
            setup.tracer_provider_from_env(parts, EXECUTOR_SERVICE),
            setup.tracer_provider_from_env(parts, API_SERVICE),
        )
        # The services that receive a run's context name the run on their spans.
        for receiving in (telemetry.executor, telemetry.api):
            if receiving is not None:
                receiving.add_span_processor(tracing.baggage_span_processor())
        return telemetry

    @contextmanager
    def story_span(self) -> Iterator[None]:
        """The root of the story's trace (a child of TRACEPARENT's span, when set)."""
        if self.demo is None:
            yield
            return
        tracer = self.demo.get_tracer("broker.cli.demo")
        parent = tracing.environment_context(self.environ)
        with tracer.start_as_current_span(ROOT_SPAN, context=parent) as span:
            self.trace_id = format_trace_id(span.get_span_context().trace_id)
            yield

    def flush(self) -> None:
        """Export what is left (at most 2 s): the demo exits right after."""
        providers = (self.demo, self.broker, self.executor, self.api)
        for provider in providers:
            if provider is not None:
                setup.Providers(tracer_provider=provider).shutdown()

    def where(self) -> str:
        otlp = setup.otlp_config(self.environ, "TRACES")
        return f"{otlp.endpoint} (OTLP, {otlp.protocol})" if otlp else "the collector"


class Story:
    """Prints one numbered line per step: ✓ when it did what it should, else ✗ and why."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.steps = 0
        colour = out.isatty() and "NO_COLOR" not in os.environ
        self._ok = "\x1b[32m✓\x1b[0m" if colour else "✓"
        self._failed = "\x1b[31m✗\x1b[0m" if colour else "✗"

    def ok(self, text: str) -> None:
        self.steps += 1
        self._line(self._ok, text)

    def failed(self, text: str) -> None:
        self.steps += 1
        self._line(self._failed, text)

    def detail(self, text: str) -> None:
        print(f"      {text}", file=self.out, flush=True)

    def _line(self, mark: str, text: str) -> None:
        print(f"{self.steps:2} {mark} {text}", file=self.out, flush=True)


def run(
    out: TextIO = sys.stdout,
    data_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Tell the whole story; 0 when every step did what it should. Without `data_dir` the
    broker keeps its data in a temporary directory, removed at the end. `environ` (default:
    the process's) says whether and where spans are exported."""
    print(
        "token-broker demo: a delegated run, from a person's ID token to a verified audit trail",
        file=out,
    )
    with _quiet_logs():
        telemetry = DemoTelemetry.from_env(os.environ if environ is None else environ)
        try:
            return _run(out, data_dir, telemetry)
        finally:
            telemetry.flush()
            if telemetry.trace_id:
                print(f"   trace {telemetry.trace_id} exported to {telemetry.where()}", file=out)


def _run(out: TextIO, data_dir: Path | None, telemetry: DemoTelemetry) -> int:
    story = Story(out)
    kept = data_dir is not None
    with ExitStack() as scratch:
        if data_dir is None:
            data_dir = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="tb-demo-")))
        where = f"data in {data_dir}" if kept else "SQLite in a temp dir"
        try:
            with ExitStack() as running:  # everything started is stopped when it closes
                _tell(story, running, data_dir, where, telemetry)
        except StepFailed as failure:
            story.failed(str(failure))
            return EXIT_FAILED
        except BrokenPipeError:
            raise  # nobody reads the story any more: main ends quietly
        except (BrokerError, grpc.RpcError, OSError, TimeoutError) as exc:
            story.failed(f"{type(exc).__name__}: {exc}")
            return EXIT_FAILED
        return _verify_audit(story, data_dir)


def _tell(
    story: Story, stack: ExitStack, data_dir: Path, where: str, telemetry: DemoTelemetry
) -> None:
    cast = Cast.new()
    # The executor holds a key of its own: the run credentials it is handed are bound to it.
    executor_key = DPoPKey.generate()
    executor = stack.enter_context(
        SampleExecutor(tracer_provider=telemetry.executor, show_leak=True, dpop_key=executor_key)
    )
    server = _start_broker(cast, data_dir, executor.target, executor_key, telemetry.broker)
    stack.callback(server.stop, 0.5)
    audience = server.broker.authn.audience
    api = stack.enter_context(
        SampleApi(
            server.target,
            credentials=cast.api.credentials(audience),
            tracer_provider=telemetry.api,
        )
    )
    executor.api_url = api.url
    story.ok(
        f"broker started on {server.target} (demo policy, {where}), "
        "with the sample executor and sample API"
    )
    with telemetry.story_span():
        _tell_the_run(story, cast, server, api, executor, telemetry)


def _tell_the_run(
    story: Story,
    cast: Cast,
    server: BrokerServer,
    api: SampleApi,
    executor: SampleExecutor,
    telemetry: DemoTelemetry,
) -> None:
    audience = server.broker.authn.audience
    traced = telemetry.demo
    id_token = cast.idp.id_token(subject="u-1001", email=PERSON, audience=PORTAL, name="Alice")
    story.ok(f"test IdP {IDP_ISSUER} signed an ID token for {PERSON}")

    with BrokerClient(
        server.target, credentials=cast.portal.credentials(audience), tracer_provider=traced
    ) as portal:
        executed = portal.execute_on_behalf_of(
            *PIPELINE, ceiling={"pipelines": "execute"}, id_token=id_token, deadline=600
        )
    run_id = executed.run.run_id
    if not executed.handed_off:
        raise StepFailed(f"run {run_id} was started but not handed off to the executor")
    execution = executor.wait_for(run_id)
    executor_key = executor.dpop_key
    if executor_key is None or execution.credential_jkt != executor_key.thumbprint:
        raise StepFailed(f"the run credential of {run_id} is not bound to the executor's key")
    story.ok(
        f"{PORTAL} called ExecuteOnBehalfOf with it: run {run_id} handed to the executor, "
        "its run credential bound to the executor's key"
    )

    _check_step_token(story, execution)
    _check_api_accepted(story, execution)
    _check_leak_refused(story, execution)
    _check_run_ended(story, execution)
    _check_token_refused(story, api, execution)
    with BrokerClient(
        server.target, credentials=cast.siem.credentials(audience), tracer_provider=traced
    ) as siem:
        _show_audit_trail(story, siem, run_id)


def _start_broker(
    cast: Cast,
    data_dir: Path,
    executor_target: str,
    executor_key: DPoPKey,
    tracer_provider: TracerProvider | None,
) -> BrokerServer:
    data_dir.mkdir(parents=True, exist_ok=True)
    executor_jwk = data_dir / "executor.jwk.json"
    executor_jwk.write_text(executor_key.public_jwk_json)
    settings = Settings(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        data_dir=data_dir,
        policy=cast.write_policy(data_dir),
        executor_target=executor_target,
        executor_dpop_jwk=executor_jwk,
        log_level="warning",
        log_format="text",
        shutdown_grace=0.5,
        max_workers=8,
    )
    server = create_server(settings, tracer_provider=tracer_provider)
    server.start()
    return server


def _check_step_token(story: Story, execution: Execution) -> None:
    if not execution.token:
        raise StepFailed(f"the executor got no step token: {execution.error or 'no reason'}")
    claims: dict[str, Any] = jwt.decode(execution.token, options={"verify_signature": False})
    if "jkt" not in (claims.get("cnf") or {}):
        raise StepFailed("the step token is not bound to a key")
    permissions = claims.get("permissions") or {}
    if permissions != STEP_PERMISSIONS:
        raise StepFailed(f"the step token carries {permissions}, not {STEP_PERMISSIONS}")
    minutes = (int(claims["exp"]) - int(claims["iat"])) / 60
    story.ok(
        f"executor minted a step token with the run credential: aud {claims['aud']}, "
        f"pipelines: read, valid {minutes:g} min, bound to the step's key (cnf.jkt)"
    )


def _check_api_accepted(story: Story, execution: Execution) -> None:
    body = execution.api_answer
    if execution.api_status != 200:
        raise StepFailed(f"the sample API answered {execution.api_status} {dict(body)}")
    if (body.get("person"), body.get("triggered_via")) != (PERSON, PORTAL):
        raise StepFailed(f"the sample API saw the wrong identities: {dict(body)}")
    story.ok(
        f"sample API verified it offline → 200: run {body['run_id']} for {body['person']} "
        f"({body['verification']}) via {body['triggered_via']}"
    )


def _check_leak_refused(story: Story, execution: Execution) -> None:
    answer = execution.leaked_answer
    if answer.status != 401 or answer.body.get("status") != "PROOF_MISSING":
        raise StepFailed(f"a leaked copy of the token got {answer.status} {dict(answer.body)}")
    story.ok(
        "a leaked copy of the step token, without the step's key, is refused → "
        f"{answer.status} {answer.body['status']}"
    )


def _check_run_ended(story: Story, execution: Execution) -> None:
    if not execution.run_ended:
        raise StepFailed(f"the executor could not end the run: {execution.error}")
    story.ok(f'executor ended the run with RevokeRun ("{FINISHED}")')


def _check_token_refused(story: Story, api: SampleApi, execution: Execution) -> None:
    answer = _answer_once_refused(api, execution.token)
    if answer.status != 401 or answer.body.get("reason") != "run ended":
        raise StepFailed(f"the API still answers {answer.status} {dict(answer.body)}")
    story.ok(f"the same step token is now rejected by the API → {answer.status} run ended")


def _answer_once_refused(api: SampleApi, token: str) -> ApiAnswer:
    deadline = time.monotonic() + REVOCATION_WAIT
    answer = call_api(api.url, token)
    while answer.status == 200 and time.monotonic() < deadline:
        time.sleep(0.02)
        answer = call_api(api.url, token)
    return answer


def _show_audit_trail(story: Story, siem: BrokerClient, run_id: str) -> None:
    run = siem.get_run(run_id).run
    if run.state != types_pb2.RUN_STATE_ENDED:
        raise StepFailed(f"run {run_id} is {types_pb2.RunState.Name(run.state)}, not ended")
    events = list(siem.stream_audit(run_id=run_id, org=PIPELINE[0], follow=False))
    actions = [event.action for event in events]
    if actions != [Action.RUN_EXECUTED_ON_BEHALF, Action.TOKEN_ISSUED, Action.RUN_ENDED]:
        raise StepFailed(f"the audit trail of run {run_id} is {actions}")
    if events[0].principal != PORTAL or any(e.on_behalf_of.email != PERSON for e in events):
        raise StepFailed(f"the audit trail of run {run_id} lacks {PORTAL} or {PERSON}")
    story.ok(f"audit trail of run {run_id}: {run.attribution.summary}")
    width = max(len(action) for action in actions)
    for event in events:
        story.detail(_audit_line(event, width))


def _audit_line(event: types_pb2.AuditEvent, width: int) -> str:
    """`seq 4  token.issued  by run:r-…  for alice@example.com  aud=sample-api …`"""
    details = json_format.MessageToDict(event.details)
    shown = [
        f"{name}={_plain(details[key])}" for key, name in _SHOWN_DETAILS.items() if details.get(key)
    ]
    person = event.on_behalf_of.email or event.on_behalf_of.subject
    by_whom = [f"by {event.principal}", f"for {person}"]
    return "  ".join([f"seq {event.sequence}", event.action.ljust(width), *by_whom, *shown])


_SHOWN_DETAILS = {
    "permission_ceiling": "ceiling",
    "aud": "aud",
    "permissions": "perms",
    "step": "step",
    "reason": "reason",
}


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in sorted(value.items()))
    return str(value)


def _verify_audit(story: Story, data_dir: Path) -> int:
    """`token-broker audit verify --data-dir`, on the log the stopped broker left behind."""
    try:
        store = open_store("sqlite:", OpenOptions(data_dir=data_dir, read_only=True))
        try:
            report = auditverify.verify(
                str(data_dir / "broker.db"),
                all_stored_events(store),
                all_checkpoints(store),
                PublishedKeys.from_records(store.public_keys()),
                pruned_through=store.pruned_through(),
            )
        finally:
            store.close()
    except (OSError, StoreRefused) as exc:
        story.failed(f"audit verify could not read the log: {exc}")
        return EXIT_FAILED
    if not report.ok:
        story.failed(f"audit verify: TAMPERED at sequence {report.first_bad_sequence}")
        return EXIT_FAILED
    story.ok(
        f"audit verify: {report.events} events, chain intact, "
        f"{report.checkpoints_verified} of {report.checkpoints} signed checkpoints verified"
    )
    return EXIT_OK


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """Only warnings, as text, while the demo runs; the previous logging setup afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logs.configure("warning", "text")
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `token-broker demo`."""
    parser = commands.add_parser(
        "demo",
        help="run the whole story against a throw-away local broker",
        description=__doc__,
        epilog="examples:\n  token-broker demo\n  token-broker demo --data-dir ./demo-data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="keep the broker's data here (a new or empty directory) to inspect it afterwards, "
        "e.g. with `token-broker audit verify --data-dir`; default: a temporary directory",
    )
    parser.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    data_dir: Path | None = args.data_dir
    if data_dir is not None and data_dir.exists() and any(data_dir.iterdir()):
        print(f"token-broker demo: {data_dir} is not empty", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(sys.stdout, data_dir)
    except KeyboardInterrupt:  # everything it started has been stopped on the way out
        return EXIT_INTERRUPTED
