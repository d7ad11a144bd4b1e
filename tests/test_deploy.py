"""The deployment examples under deploy/ (Dockerfile, compose.yaml, kubernetes/) run what
the broker accepts: their command lines and environments parse as `token-broker serve`
settings, their files (policy, keys, TLS) are where those settings look, their ports and
probes agree with the addresses the broker listens on, and — with `serve --check` — a broker
given exactly those settings (store pointed at a throw-away PostgreSQL, secrets made up in
tmp) would serve. No container engine here: what cannot be run is read."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from broker import settings
from broker.cli import main as cli
from broker.policy.file import load_policy
from broker.runs.keys import load_private_key
from broker.settings import Settings, SettingsError, split_host_port
from broker.store.factory import OpenOptions, open_store
from tests.accounts import private_pem
from tests.certs import new_ca, server_cert
from tests.support import REPO, eventually

DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE_ENV = {"POSTGRES_PASSWORD": "compose-test-password"}  # what `docker compose` is given


def serve_has_check() -> bool:
    """`token-broker serve --check` (with /healthz and /readyz) arrives with the HTTP work of
    issue 17; until it is in this tree the tests that run it are skipped, not faked."""
    commands = next(
        action
        for action in cli.build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return "--check" in commands.choices["serve"].format_help()


needs_serve_check = pytest.mark.skipif(
    not serve_has_check(), reason="token-broker serve --check, /healthz, /readyz not here yet"
)


# --- reading the files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dockerfile:
    instructions: list[tuple[str, str]]

    @classmethod
    def read(cls) -> Dockerfile:
        text = (DEPLOY / "Dockerfile").read_text()
        logical = re.sub(r"\\\n", " ", "\n".join(_without_comments(text.splitlines())))
        found = []
        for line in logical.splitlines():
            if line.strip():
                keyword, _, rest = line.strip().partition(" ")
                found.append((keyword.upper(), rest.strip()))
        return cls(found)

    def all(self, keyword: str) -> list[str]:
        return [rest for k, rest in self.instructions if k == keyword]

    def last(self, keyword: str) -> str:
        (*_, rest) = self.all(keyword)
        return rest

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for rest in self.all("ENV"):
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                values[name] = value
        return values

    def command(self) -> list[str]:
        entrypoint: list[str] = json.loads(self.last("ENTRYPOINT"))
        cmd: list[str] = json.loads(self.last("CMD"))
        return entrypoint + cmd


def _without_comments(lines: list[str]) -> Iterator[str]:
    for line in lines:
        if not line.lstrip().startswith("#"):
            yield line


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object under deploy/kubernetes by (kind, name)."""
    found = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in load_yaml(path):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`."""

    def one(match: re.Match[str]) -> str:
        name, operator, word = match[1], match[2] or "", match[3] or ""
        if environ.get(name):
            return environ[name]
        if operator == ":?":
            raise AssertionError(f"compose refuses to start without {name}: {word}")
        return word

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)


def address_port(address: str) -> int:
    return split_host_port(address, "address")[1]


# --- one example as a `token-broker serve` invocation -------------------------------------------


@dataclass
class Invocation:
    """What a container runs: `token-broker` argv and environment, and where its mounts are
    on this machine (container path -> host path)."""

    argv: list[str]
    env: dict[str, str]
    mounts: dict[str, Path] = field(default_factory=dict)

    def localized(self, value: str) -> str:
        """`value` with container paths turned into the host paths mounted there."""
        if not self.mounts:
            return value
        paths = "|".join(re.escape(p) for p in sorted(self.mounts, key=len, reverse=True))
        # One pass, whole path components, at the start of the value or after `--flag=`.
        pattern = rf"(?:^|(?<==))({paths})(?=/|$)"
        return re.sub(pattern, lambda found: str(self.mounts[found[1]]), value)

    def serve_flags(self) -> list[str]:
        assert self.argv[:2] == ["token-broker", "serve"], self.argv
        return [self.localized(arg) for arg in self.argv[2:]]

    def serve_env(self) -> dict[str, str]:
        return {name: self.localized(value) for name, value in self.env.items()}

    def settings(self) -> Settings:
        return settings.parse(self.serve_flags(), self.serve_env())

    def with_store(self, url: str) -> Invocation:
        """The same, with its store (flag or variable) replaced by `url`."""
        argv = list(self.argv)
        for i, arg in enumerate(argv):
            if arg == "--store":
                argv[i + 1] = url
            elif arg.startswith("--store="):
                argv[i] = f"--store={url}"
        env = dict(self.env)
        if "TOKEN_BROKER_STORE" in env:
            env["TOKEN_BROKER_STORE"] = url
        return Invocation(argv, env, self.mounts)

    def on_loopback(self) -> list[str]:
        """Its serve flags, listening on 127.0.0.1 port 0 instead (the last flag wins)."""
        return [*self.serve_flags(), "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]


def compose_file() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return document


def compose_brokers() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose_file()["services"]
    return {
        name: service
        for name, service in services.items()
        if service.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def compose_invocation(name: str, tmp_path: Path) -> Invocation:
    """A compose broker service: the image's entrypoint and environment, the service's
    command and environment, its bind mounts (deploy/...) and named volumes (in tmp)."""
    image = Dockerfile.read()
    service = compose_brokers()[name]
    command = [interpolate(part, COMPOSE_ENV) for part in service["command"]]
    environment = {
        key: interpolate(str(value), COMPOSE_ENV) for key, value in service["environment"].items()
    }
    mounts: dict[str, Path] = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = DEPLOY / source
        else:
            mounts[target] = tmp_path / "volumes" / source
            mounts[target].mkdir(parents=True, exist_ok=True)
    entrypoint = json.loads(image.last("ENTRYPOINT"))
    return Invocation([*entrypoint, *command], {**image.env(), **environment}, mounts)


@dataclass(frozen=True)
class MadeUpSecrets:
    """Real key material in tmp for the Secret's placeholders."""

    signing_key: bytes
    tls_cert: bytes
    tls_key: bytes

    @classmethod
    def new(cls) -> MadeUpSecrets:
        server = server_cert(new_ca())
        signing = private_pem(ec.generate_private_key(ec.SECP256R1()))
        return cls(signing, server.cert_pem, server.key_pem)


def kubernetes_container() -> dict[str, Any]:
    deployment = manifests()[("Deployment", "token-broker")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def kubernetes_invocation(tmp_path: Path, made_up: MadeUpSecrets) -> Invocation:
    """The Deployment's container: the image's entrypoint and environment, its args, env
    (secretKeyRef from the Secret manifest) and volumes (ConfigMap data as written, Secret
    items with made-up key material, emptyDirs in tmp)."""
    objects = manifests()
    deployment = objects[("Deployment", "token-broker")]
    pod = deployment["spec"]["template"]["spec"]
    container = kubernetes_container()
    env: dict[str, str] = {}
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            secret = objects[("Secret", ref["name"])]
            env[variable["name"]] = secret["stringData"][ref["key"]]
    replacements = {
        ("token-broker", "signing-key.pem"): made_up.signing_key,
        ("token-broker-tls", "tls.crt"): made_up.tls_cert,
        ("token-broker-tls", "tls.key"): made_up.tls_key,
    }
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        directory = tmp_path / "volumes" / mount["name"]
        directory.mkdir(parents=True, exist_ok=True)
        _fill_volume(directory, volumes[mount["name"]], objects, replacements)
        mounts[mount["mountPath"]] = directory
    image = Dockerfile.read()
    entrypoint = json.loads(image.last("ENTRYPOINT"))
    return Invocation([*entrypoint, *container["args"]], {**image.env(), **env}, mounts)


def _fill_volume(
    directory: Path,
    volume: dict[str, Any],
    objects: dict[tuple[str, str], dict[str, Any]],
    replacements: dict[tuple[str, str], bytes],
) -> None:
    if "configMap" in volume:
        source = volume["configMap"]
        data = objects[("ConfigMap", source["name"])]["data"]
        contents = {key: str(value).encode() for key, value in data.items()}
    elif "secret" in volume:
        source = volume["secret"]
        name = source["secretName"]
        stored = objects[("Secret", name)]["stringData"]
        contents = {key: replacements.get((name, key), str(stored[key]).encode()) for key in stored}
    else:
        return  # emptyDir
    items = source.get("items") or [{"key": key, "path": key} for key in contents]
    for item in items:
        assert item["key"] in contents, f"{item['key']} is not in {source}"
        target = directory / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(contents[item["key"]])


# --- the Dockerfile -------------------------------------------------------------------------------


def test_the_image_runs_token_broker_serve_as_a_non_root_user_with_its_data_on_a_volume() -> None:
    image = Dockerfile.read()
    env = image.env()
    assert image.command() == ["token-broker", "serve"]
    user = image.last("USER").split(":")[0]
    assert user not in ("", "0", "root")
    assert json.loads(image.last("VOLUME")) == [env["TOKEN_BROKER_DATA_DIR"]]
    data_dir = env["TOKEN_BROKER_DATA_DIR"]
    made_for_broker = rf"install -d -o broker .*{data_dir}"
    created = [run for run in image.all("RUN") if re.search(made_for_broker, run)]
    assert created, "the data dir is made, owned by the broker user"
    assert image.last("FROM").startswith("python:3.") and image.last("FROM").endswith("-slim")
    # Both distributions from the checkout: the server requires the client at its own version.
    (install,) = [run for run in image.all("RUN") if "pip install" in run]
    assert "'./clients[tracing]' '.[postgresql]'" in install


def test_the_image_exposes_and_health_checks_the_ports_it_listens_on() -> None:
    image = Dockerfile.read()
    env = image.env()
    grpc_port = address_port(env["TOKEN_BROKER_LISTEN"])
    http_port = address_port(env["TOKEN_BROKER_HTTP_LISTEN"])
    assert {int(port) for port in image.last("EXPOSE").split()} == {grpc_port, http_port}
    health = image.last("HEALTHCHECK")
    assert f"http://127.0.0.1:{http_port}/readyz" in health
    assert "CMD" in health


def test_the_image_alone_refuses_plaintext_beyond_loopback() -> None:
    with pytest.raises(SettingsError, match="without TLS"):
        settings.parse([], Dockerfile.read().env())


# --- compose --------------------------------------------------------------------------------------


def test_compose_runs_two_broker_replicas_of_the_image_on_postgresql() -> None:
    services = compose_file()["services"]
    brokers = compose_brokers()
    assert len(brokers) == 2
    assert services["postgres"]["image"].startswith("postgres:")
    assert "healthcheck" in services["postgres"]
    image = Dockerfile.read().env()
    data_volumes = []
    for service in brokers.values():
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        data = [v for v in service["volumes"] if v.endswith(":" + image["TOKEN_BROKER_DATA_DIR"])]
        assert len(data) == 1, "each replica keeps its data dir (its signing key) on a volume"
        data_volumes.append(data[0])
    assert len(set(data_volumes)) == 2, "one data volume per replica"


def test_compose_publishes_each_replicas_grpc_and_http_ports_on_distinct_host_ports(
    tmp_path: Path,
) -> None:
    host_ports = []
    for name, service in compose_brokers().items():
        configured = compose_invocation(name, tmp_path).settings()
        container_ports = set()
        for mapping in service["ports"]:
            *_, host, container = mapping.split(":")
            host_ports.append(int(host))
            container_ports.add(int(container))
        expected = {address_port(configured.listen), address_port(configured.http_listen)}
        assert container_ports == expected, name
    assert len(host_ports) == len(set(host_ports))


@pytest.mark.parametrize("replica", ["broker-a", "broker-b"])
def test_compose_replica_settings_parse_as_serve_settings_with_the_example_policy(
    replica: str, tmp_path: Path
) -> None:
    invocation = compose_invocation(replica, tmp_path)

    configured = invocation.settings()

    assert configured.store.startswith("postgresql://broker:compose-test-password@postgres:")
    assert configured.insecure and not configured.tls_enabled  # said in the file's header
    assert configured.issuer  # every replica must name the same one
    assert configured.policy is not None
    assert len(load_policy(configured.policy).accounts) == 4


def test_compose_replicas_share_one_issuer_store_and_policy(tmp_path: Path) -> None:
    configured = [compose_invocation(name, tmp_path).settings() for name in compose_brokers()]
    assert len({(s.issuer, s.store, s.policy) for s in configured}) == 1


# --- Kubernetes -----------------------------------------------------------------------------------


def test_kubernetes_deployment_settings_parse_with_tls_a_shared_signing_key_and_the_policy(
    tmp_path: Path,
) -> None:
    invocation = kubernetes_invocation(tmp_path, MadeUpSecrets.new())

    configured = invocation.settings()

    assert configured.tls_enabled and not configured.insecure
    assert configured.store.startswith("postgresql://")  # from the Secret
    assert configured.issuer.startswith("https://")
    assert configured.policy is not None and configured.signing_key is not None
    assert len(load_policy(configured.policy).accounts) == 4
    load_private_key(configured.signing_key)
    assert configured.tls_cert is not None and configured.tls_cert.read_bytes()


def test_kubernetes_probes_and_services_point_at_the_ports_the_broker_listens_on(
    tmp_path: Path,
) -> None:
    container = kubernetes_container()
    configured = kubernetes_invocation(tmp_path, MadeUpSecrets.new()).settings()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {
        "grpc": address_port(configured.listen),
        "http": address_port(configured.http_listen),
    }
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes == {
        "readinessProbe": {"path": "/readyz", "port": "http"},
        "livenessProbe": {"path": "/healthz", "port": "http"},
    }
    selector = manifests()[("Deployment", "token-broker")]["spec"]["selector"]["matchLabels"]
    services = [doc for (kind, _), doc in manifests().items() if kind == "Service"]
    assert services
    for service in services:
        assert service["spec"]["selector"] == selector
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
            assert port["port"] == ports[port["targetPort"]]


def test_kubernetes_pods_run_as_the_images_non_root_user() -> None:
    pod = manifests()[("Deployment", "token-broker")]["spec"]["template"]["spec"]
    image_user = int(Dockerfile.read().last("USER").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_user
    container = kubernetes_container()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (shutdown_grace,) = [a.split("=")[1] for a in container["args"] if "--shutdown-grace" in a]
    assert pod["terminationGracePeriodSeconds"] > float(shutdown_grace)


def test_the_config_map_is_the_example_policy_and_its_keys_as_they_are() -> None:
    data = manifests()[("ConfigMap", "token-broker-policy")]["data"]
    expected = {"policy.toml": (DEPLOY / "policy.toml").read_text()}
    expected |= {key.name: key.read_text() for key in (DEPLOY / "keys").glob("*.pem")}
    assert data == expected


def test_the_secret_holds_the_store_url_signing_key_and_tls_key_and_nothing_real() -> None:
    objects = manifests()
    broker_secret = objects[("Secret", "token-broker")]["stringData"]
    tls_secret = objects[("Secret", "token-broker-tls")]
    assert set(broker_secret) == {"store-url", "signing-key.pem"}
    assert tls_secret["type"] == "kubernetes.io/tls"
    assert set(tls_secret["stringData"]) == {"tls.crt", "tls.key"}
    for value in [*broker_secret.values(), *tls_secret["stringData"].values()]:
        assert "BEGIN" not in value, "placeholders only: no key material in a repository"


# --- serve --check and the probes, over real processes --------------------------------------------


def run_serve_check(invocation: Invocation, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`serve --check` as an operator runs it before rolling out a change: on the database the
    replicas already use (the store is set up first; --check opens it read-only)."""
    configured = settings.parse(invocation.on_loopback(), invocation.serve_env())
    open_store(configured.store, OpenOptions(data_dir=data_dir)).close()
    return subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--check", *invocation.on_loopback()],
        cwd=REPO,
        env={**_clean_environ(), **invocation.serve_env(), "TOKEN_BROKER_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_BROKER_")}


@needs_serve_check
@pytest.mark.slow
def test_compose_replica_passes_serve_check_on_a_real_postgresql(
    tmp_path: Path, pg_dsn: str
) -> None:
    invocation = compose_invocation("broker-a", tmp_path).with_store(pg_dsn)

    checked = run_serve_check(invocation, invocation.mounts["/var/lib/token-broker"])

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip()
    assert "Traceback" not in checked.stderr


@needs_serve_check
@pytest.mark.slow
def test_kubernetes_deployment_passes_serve_check_on_a_real_postgresql(
    tmp_path: Path, pg_dsn: str
) -> None:
    invocation = kubernetes_invocation(tmp_path, MadeUpSecrets.new()).with_store(pg_dsn)

    checked = run_serve_check(invocation, invocation.mounts["/var/lib/token-broker"])

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip()
    assert "Traceback" not in checked.stderr


@contextmanager
def serving(invocation: Invocation, log_path: Path) -> Iterator[dict[str, Any]]:
    """`token-broker serve` with the invocation's settings on 127.0.0.1 port 0; yields its
    "token-broker serving" log entry once it serves."""
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", *invocation.on_loopback()],
            cwd=REPO,
            env={**_clean_environ(), **invocation.serve_env()},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        yield eventually(
            lambda: _serving_entry(log_path, process),
            within=30,
            interval=0.05,
            what="the broker serving",
        )
    finally:
        process.terminate()
        process.wait(timeout=15)


@pytest.mark.slow
def test_a_broker_with_the_kubernetes_deployments_settings_serves_tls_on_postgresql(
    tmp_path: Path, pg_dsn: str
) -> None:
    invocation = kubernetes_invocation(tmp_path, MadeUpSecrets.new()).with_store(pg_dsn)

    with serving(invocation, tmp_path / "broker.log") as serving_entry:
        jwks = _http_status(f"http://127.0.0.1:{serving_entry['http_port']}/.well-known/jwks.json")

    assert jwks == 200
    assert serving_entry["tls"] is True
    assert serving_entry["issuer"] == "https://token-broker.example.com"
    assert str(serving_entry["store"]).startswith("postgresql://")


@needs_serve_check
@pytest.mark.slow
def test_kubernetes_probe_paths_answer_200_from_a_broker_with_the_deployments_settings(
    tmp_path: Path, pg_dsn: str
) -> None:
    invocation = kubernetes_invocation(tmp_path, MadeUpSecrets.new()).with_store(pg_dsn)
    container = kubernetes_container()

    with serving(invocation, tmp_path / "broker.log") as serving_entry:
        answers = {
            probe: _http_status(
                f"http://127.0.0.1:{serving_entry['http_port']}"
                + container[probe]["httpGet"]["path"]
            )
            for probe in ("readinessProbe", "livenessProbe")
        }

    assert answers == {"readinessProbe": 200, "livenessProbe": 200}


def _serving_entry(log_path: Path, process: subprocess.Popen[str]) -> dict[str, Any] | None:
    if process.poll() is not None:
        raise RuntimeError(f"broker exited early:\n{log_path.read_text()}")
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "token-broker serving":
            return dict(entry)
    return None


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        return int(refused.code)
