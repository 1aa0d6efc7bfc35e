"""Every file under deploy/ is checked here, offline.

What a deployment would find out the hard way — a compose file whose worker starts before the
roles exist, a unit that runs a subcommand that is not there, a manifest Kubernetes refuses, an
alert on a metric that was renamed — fails here first. Kubernetes manifests are validated
against the API's JSON schemas (kubernetes-validate ships them); the Prometheus Operator's
ServiceMonitor is not part of them and is checked field by field. Alert and dashboard queries
are parsed with a PromQL parser. External tools (`docker compose config`, `systemd-analyze`,
`kubectl kustomize`) add their own checks when the machine has them.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import promql_parser
import pytest
import yaml

from cdc_audit.cli import build_parser, main
from cdc_audit.policy import JobsPolicy
from cdc_audit.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OPERATIONS = ROOT / "docs" / "operations.md"

# The metric names dashboards and alerts may rely on (docs/worker.md#metrics).
CONTRACT_METRICS = frozenset(
    {
        "cdc_audit_events_sealed_total",
        "cdc_audit_events_missing_context_total",
        "cdc_audit_lag_bytes",
        "cdc_audit_lag_seconds",
        "cdc_audit_slot_retained_wal_bytes",
        "cdc_audit_slot_lost",
        "cdc_audit_gap_events",
        "cdc_audit_last_checkpoint_timestamp_seconds",
        "cdc_audit_last_verify_ok",
        "cdc_audit_last_verify_timestamp_seconds",
        "cdc_audit_last_verify_first_bad_seq",
        "cdc_audit_job_runs_total",
        "cdc_audit_job_failures_total",
        "cdc_audit_worker_active",
        "cdc_audit_up",
    }
)

# Which test covers which file: a new file under deploy/ must be added here, with a check.
CHECKED_FILES = (
    "README.md",
    "Dockerfile",
    "docker-compose.yml",
    "compose/policy.yaml",
    "compose/initdb/10-cdc-audit.sh",
    "systemd/*.service",
    "systemd/*.timer",
    "kubernetes/*.yaml",
    "prometheus/alerts.yml",
    "grafana/dashboard.json",
)

INSTALLED_CLI = "/opt/cdc-audit/bin/cdc-audit"
METRICS_PORT = "9595"
IMAGE_UID = 10001


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _cli_args(argv: list[str]) -> Any:
    """Parse a cdc-audit command line as the real CLI would; a usage error fails the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`cdc-audit {shlex.join(argv)}` is not a valid command line (exit {exc})")


def _command_name(argv: list[str]) -> str:
    return str(_cli_args(argv).command)


def _policy_checks(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    code = main(["check", "--policy", str(path)])
    assert code == 0, capsys.readouterr().err


def test_every_deploy_file_is_checked() -> None:
    files = [p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()]
    unchecked = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in CHECKED_FILES)]
    assert not unchecked, f"add a check to tests/unit/test_deploy.py for {unchecked}"
    for pattern in CHECKED_FILES:
        assert any(fnmatch.fnmatch(f, pattern) for f in files), f"nothing matches {pattern}"


@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"}),
    ids=lambda p: p.relative_to(DEPLOY).as_posix(),
)
def test_yaml_files_parse(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert documents and all(isinstance(d, dict) for d in documents)


# ---- Dockerfile and .dockerignore


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    out = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def _image_of(from_args: str, build_args: dict[str, str]) -> str:
    image = from_args.split()[0]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: build_args[m[1] or m[2]], image)


def test_dockerfile_bases_are_pinned_by_tag_and_digest() -> None:
    instructions = _dockerfile()
    build_args: dict[str, str] = {}
    stages: set[str] = set()
    bases = []
    for name, rest in instructions:
        if name == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            build_args[key] = value
        if name == "FROM":
            image = _image_of(rest, build_args)
            words = rest.split()
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])
            if image not in stages:
                bases.append(image)
    assert bases
    for image in bases:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), (
            f"{image}: pin the base by tag and digest"
        )
        assert ":latest@" not in image


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    users = [rest for name, rest in _final_stage() if name == "USER"]
    assert users, "the final stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == IMAGE_UID, (
        "a numeric uid lets Kubernetes' runAsNonRoot verify it"
    )


def test_dockerfile_health_check_probes_healthz_on_the_metrics_port() -> None:
    final = _final_stage()
    env = " ".join(rest for name, rest in final if name == "ENV")
    assert f"CDC_AUDIT_METRICS_PORT={METRICS_PORT}" in env
    checks = [rest for name, rest in final if name == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0] and "CDC_AUDIT_METRICS_PORT" in checks[0]
    exposed = [rest for name, rest in final if name == "EXPOSE"]
    assert exposed == [METRICS_PORT]


def test_dockerfile_entrypoint_is_the_cli_and_defaults_to_the_worker() -> None:
    final = _final_stage()
    entrypoint = json.loads(next(rest for name, rest in final if name == "ENTRYPOINT"))
    command = json.loads(next(rest for name, rest in final if name == "CMD"))
    assert entrypoint == ["cdc-audit"]
    assert _command_name(command) == "worker"


def _wheel_inputs() -> set[str]:
    """What hatchling reads to build the wheel: the readme, the packages, force-included dirs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    return (
        {"pyproject.toml", project["project"]["readme"]}
        | set(wheel["packages"])
        | set(wheel.get("force-include", {}))
    )


def _copied_sources() -> set[str]:
    sources: set[str] = set()
    for name, rest in _dockerfile():
        if name == "COPY" and not rest.startswith("--from"):
            sources.update(s.rstrip("/") for s in rest.split()[:-1])
    return sources


def test_dockerfile_copies_everything_the_wheel_is_built_from() -> None:
    sources = _copied_sources()
    missing = _wheel_inputs() - sources
    assert not missing, f"the image build would lack {sorted(missing)}"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern[1:] if negated else pattern
        glob = glob.rstrip("/")
        for candidate in candidates:
            matched = fnmatch.fnmatch(candidate, glob) or (
                glob.startswith("**/") and fnmatch.fnmatch(candidate.split("/")[-1], glob[3:])
            )
            if matched:
                ignored = not negated
    return ignored


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    text = (ROOT / ".dockerignore").read_text(encoding="utf-8")
    patterns = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    for source in _copied_sources():
        for path in [source, *(p.relative_to(ROOT).as_posix() for p in (ROOT / source).rglob("*"))]:
            if "__pycache__" in path:
                continue
            assert not _dockerignored(path, patterns), f"{path} is excluded from the context"
    for private in (".venv", ".git", "tests", "cdc_audit/__pycache__/cli.cpython-311.pyc"):
        assert _dockerignored(private, patterns), f"{private} would be sent to the daemon"


# ---- docker compose


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = _yaml(DEPLOY / "docker-compose.yml")
    return compose


def _postgres_settings(command: list[str]) -> dict[str, str]:
    assert command[0] == "postgres"
    settings = {}
    for flag, value in zip(command[1::2], command[2::2], strict=True):
        assert flag == "-c"
        key, _, setting = value.partition("=")
        settings[key] = setting
    return settings


def test_compose_postgres_is_set_up_for_logical_replication() -> None:
    postgres = _compose()["services"]["postgres"]
    settings = _postgres_settings(postgres["command"])
    assert settings["wal_level"] == "logical"
    assert int(settings["max_replication_slots"]) >= 2
    assert int(settings["max_wal_senders"]) >= 2
    # -1 (the default) lets a stalled slot fill the disk.
    assert settings["max_slot_wal_keep_size"] not in ("", "-1")
    assert "tcp_keepalives_idle" in settings


def test_compose_services_are_built_or_pinned_and_healthy() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "apply", "grant", "worker"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        image = service.get("image", "")
        if "build" not in service:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (
                f"{name}: pin the image tag"
            )
        else:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        one_shot = service.get("restart") == "no"
        if not one_shot:
            assert service.get("healthcheck", {}).get("test"), f"{name}: add a healthcheck"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_compose_start_order_waits_for_what_each_service_needs() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert services[dependency].get("healthcheck"), f"{dependency} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", f"{dependency} never ends"
            else:
                assert condition == "service_started", f"{name}: unknown condition {condition}"
    # The worker's role needs cdc_audit_writer, which exists only after apply and the grant.
    assert services["grant"]["depends_on"]["apply"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["worker"]["depends_on"]["grant"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["apply"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_worker_gets_the_settings_it_needs() -> None:
    worker = _compose()["services"]["worker"]
    env = worker["environment"]
    for name in (
        "CDC_AUDIT_DSN",
        "CDC_AUDIT_POLICY",
        "CDC_AUDIT_SIGNING_KEY_FILE",
        "CDC_AUDIT_REDACTION_KEY_FILE",
        "CDC_AUDIT_METRICS_PORT",
    ):
        assert env.get(name), f"the worker needs {name}"
    assert str(env["CDC_AUDIT_METRICS_PORT"]) == METRICS_PORT
    assert any(port.endswith(f":{METRICS_PORT}") for port in worker["ports"])
    assert f":{METRICS_PORT}/healthz" in " ".join(worker["healthcheck"]["test"])
    assert "user=postgres" not in env["CDC_AUDIT_DSN"], "the worker must not run as superuser"
    assert _command_name(worker["command"]) == "worker"


def _cdc_audit_invocations(script: str) -> Iterator[list[str]]:
    """The argument lists of every `cdc-audit ...` in a shell script."""
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            if word == "cdc-audit":
                args = []
                for arg in words[i + 1 :]:
                    if arg in {"||", "&&", ";", "|", ">"}:
                        break
                    args.append(arg)
                yield args


def test_compose_setup_script_runs_real_commands() -> None:
    services = _compose()["services"]
    script = services["apply"]["command"][0]
    commands = [_command_name(args) for args in _cdc_audit_invocations(script)]
    assert commands == ["keygen", "apply", "keys"]
    assert _command_name(services["cli"]["command"]) == "status"


def test_compose_policy_and_initdb_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy_text = (DEPLOY / "compose" / "policy.yaml").read_text(encoding="utf-8")
    _policy_checks(tmp_path, policy_text, capsys)
    init = (DEPLOY / "compose" / "initdb" / "10-cdc-audit.sh").read_text(encoding="utf-8")
    for entry in yaml.safe_load(policy_text)["tables"]:
        assert f"CREATE TABLE {entry['table']}" in init, f"initdb does not create {entry['table']}"
    assert "LOGIN REPLICATION" in init
    grant = " ".join(_compose()["services"]["grant"]["command"])
    assert "GRANT cdc_audit_writer TO cdc_worker" in grant


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="docker compose is not installed",
)
def test_docker_compose_config_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker", "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        env={"POSTGRES_PASSWORD": "x", "CDC_WORKER_PASSWORD": "y", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr


# ---- systemd


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value): keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}:{number}: not a key=value line"
        current.append((key.strip(), value.strip()))
    return sections


def _values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for k, value in section if k == key]


SERVICES = sorted((DEPLOY / "systemd").glob("*.service"))
TIMERS = sorted((DEPLOY / "systemd").glob("*.timer"))

# The worker's scheduled jobs (policy `jobs`) and the command each timer runs instead.
JOB_COMMANDS = {
    "purge": ["purge"],
    "archive": ["archive"],
    "verify": ["verify", "--since-last"],
    "snapshot": ["snapshot"],
    "privileges": ["drift"],
}


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_systemd_service_runs_a_real_command(path: Path) -> None:
    unit = _unit(path)
    assert _values(unit["Unit"], "Description")
    service = unit["Service"]
    (exec_start,) = _values(service, "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED_CLI
    _cli_args(argv[1:])
    assert _values(service, "User") == ["cdc-audit"]
    assert _values(service, "EnvironmentFile")
    settings = {f"CDC_AUDIT_{name.upper()}" for name in Settings.model_fields}
    credentials = {v.split(":")[0] for v in _values(service, "LoadCredential")}
    for assignment in _values(service, "Environment"):
        name, _, value = assignment.partition("=")
        assert name in settings, f"{path.name}: {name} is not a cdc-audit setting"
        if value.startswith("%d/"):
            assert value[3:] in credentials, f"{path.name}: no LoadCredential for {value}"


def test_systemd_worker_restarts_but_not_on_invalid_configuration() -> None:
    service = _unit(DEPLOY / "systemd" / "cdc-audit-worker.service")
    assert shlex.split(_values(service["Service"], "ExecStart")[0])[1:] == ["worker"]
    assert _values(service["Service"], "Restart") == ["on-failure"]
    assert "2" in _values(service["Service"], "RestartPreventExitStatus")[0].split()
    assert _values(service["Install"], "WantedBy") == ["multi-user.target"]
    for name in ("CDC_AUDIT_SIGNING_KEY_FILE", "CDC_AUDIT_REDACTION_KEY_FILE"):
        assert any(v.startswith(f"{name}=") for v in _values(service["Service"], "Environment"))


def test_systemd_timers_cover_every_scheduled_job() -> None:
    runs = {}
    for timer in TIMERS:
        service = timer.with_suffix(".service")
        assert service.exists(), f"{timer.name} has no {service.name}"
        timer_unit = _unit(timer)
        assert _values(timer_unit["Timer"], "OnCalendar"), timer.name
        assert _values(timer_unit["Timer"], "Persistent") == ["true"]
        assert _values(timer_unit["Install"], "WantedBy") == ["timers.target"]
        job = _unit(service)
        assert _values(job["Service"], "Type") == ["oneshot"]
        assert "Install" not in job, f"{service.name} is started by its timer, not enabled"
        runs[timer.stem] = shlex.split(_values(job["Service"], "ExecStart")[0])[1:]
    expected = {f"cdc-audit-{_timer_name(job)}": JOB_COMMANDS[job] for job in _jobs()}
    assert runs == expected


def _jobs() -> list[str]:
    return list(JobsPolicy.model_fields)


def _timer_name(job: str) -> str:
    return "drift" if job == "privileges" else job


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists: point it at one that does.
    copies = []
    for path in [*SERVICES, *TIMERS]:
        copy = tmp_path / path.name
        copy.write_text(
            path.read_text(encoding="utf-8").replace(INSTALLED_CLI, "/bin/true"), encoding="utf-8"
        )
        copies.append(str(copy))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=false", *copies],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    complaints = [ln for ln in result.stderr.splitlines() if str(tmp_path) in ln]
    assert result.returncode == 0 and not complaints, result.stderr
    calendars = [_values(_unit(t)["Timer"], "OnCalendar")[0] for t in TIMERS]
    result = subprocess.run(
        ["systemd-analyze", "calendar", *calendars], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# ---- Kubernetes


def _manifests() -> dict[str, dict[str, Any]]:
    """Every manifest the kustomization lists, by kind/name."""
    kustomization = _yaml(DEPLOY / "kubernetes" / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, "kustomization.yaml must list every manifest, and only those"
    found = {}
    for name in sorted(listed):
        for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text(encoding="utf-8")):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def _oldest_and_newest() -> list[str]:
    available = sorted(
        set(kubernetes_validate.utils.all_versions()), key=lambda v: tuple(map(int, v.split(".")))
    )
    # The oldest Kubernetes the manifests claim to work with (docs/operations.md).
    return ["1.29.0" if "1.29.0" in available else available[0], available[-1]]


@pytest.mark.parametrize("version", _oldest_and_newest())
def test_kubernetes_manifests_match_the_api_schema(version: str) -> None:
    problems = []
    for key, doc in _manifests().items():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked in test_kubernetes_service_monitor_scrapes_the_workers
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            # The exception's text quotes the whole schema: keep the part a reader needs.
            problems.append(f"{key}: {exc.message} at {'.'.join(map(str, exc.path))}")
    assert not problems, f"Kubernetes {version} would refuse: {problems}"


def _worker_deployment() -> tuple[dict[str, Any], dict[str, Any]]:
    manifests = _manifests()
    deployment = manifests["Deployment/cdc-audit-worker"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def test_kubernetes_worker_runs_an_active_and_a_standby() -> None:
    deployment, container = _worker_deployment()
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    # A readiness probe on /readyz would keep the standby unready forever, and a rolling
    # update would then wait for it forever: readiness means "alive" here.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    rolling = spec["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] == 1
    assert _command_name(container["args"]) == "worker"
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", container["image"])
    assert not container["image"].endswith(":latest")


def test_kubernetes_worker_is_wired_to_its_secret_config_and_volumes() -> None:
    manifests = _manifests()
    deployment, container = _worker_deployment()
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e for e in container["env"]}
    settings = {f"CDC_AUDIT_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= settings
    for name in (
        "CDC_AUDIT_DSN",
        "CDC_AUDIT_POLICY",
        "CDC_AUDIT_SIGNING_KEY_FILE",
        "CDC_AUDIT_REDACTION_KEY_FILE",
        "CDC_AUDIT_METRICS_PORT",
    ):
        assert name in env, f"the worker needs {name}"
    secret_ref = env["CDC_AUDIT_DSN"]["valueFrom"]["secretKeyRef"]
    secret = manifests[f"Secret/{secret_ref['name']}"]
    assert secret_ref["key"] in secret["stringData"]
    assert env["CDC_AUDIT_METRICS_PORT"]["value"] == METRICS_PORT
    (port,) = container["ports"]
    assert str(port["containerPort"]) == METRICS_PORT and port["name"] == "metrics"
    assert container["livenessProbe"]["httpGet"]["port"] == "metrics"

    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            config = manifests[f"ConfigMap/{volume['configMap']['name']}"]
            files.update({f"{mount['mountPath']}/{k}": k for k in config["data"]})
        if "secret" in volume:
            assert volume["secret"]["secretName"] in {
                k.split("/")[1] for k in manifests if k.startswith("Secret/")
            }
            for item in volume["secret"]["items"]:
                assert item["key"] in secret["stringData"]
                files[f"{mount['mountPath']}/{item['path']}"] = item["key"]
        if "persistentVolumeClaim" in volume:
            assert f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}" in (
                manifests
            )
    for name in ("CDC_AUDIT_POLICY", "CDC_AUDIT_SIGNING_KEY_FILE", "CDC_AUDIT_REDACTION_KEY_FILE"):
        assert env[name]["value"] in files, f"{name} names a file no volume provides"
    assert pod["serviceAccountName"] in {
        k.split("/")[1] for k in manifests if k.startswith("ServiceAccount/")
    }


def test_kubernetes_worker_runs_unprivileged_as_the_image_user() -> None:
    deployment, container = _worker_deployment()
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == IMAGE_UID
    own = container["securityContext"]
    assert own["allowPrivilegeEscalation"] is False
    assert own["readOnlyRootFilesystem"] is True
    assert own["capabilities"]["drop"] == ["ALL"]


def test_kubernetes_policy_config_map_is_a_valid_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _manifests()["ConfigMap/cdc-audit-policy"]
    policy = config["data"]["policy.yaml"]
    _policy_checks(tmp_path, policy, capsys)
    # Both replicas write the anchor: it must be the shared volume, not a pod's own disk.
    _, container = _worker_deployment()
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert yaml.safe_load(policy)["checkpoints"]["anchor_dir"] in mounts


def test_kubernetes_service_monitor_scrapes_the_workers() -> None:
    manifests = _manifests()
    monitors = [d for d in manifests.values() if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1
    monitor = monitors[0]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    services = [d for d in manifests.values() if d["kind"] == "Service"]
    selected = [
        s
        for s in services
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert len(selected) == 1, "the ServiceMonitor must select exactly the metrics Service"
    service = selected[0]
    _, container = _worker_deployment()
    deployment = manifests["Deployment/cdc-audit-worker"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # The standby is a healthy replica too: scrape it whatever its readiness.
    assert service["spec"]["publishNotReadyAddresses"] is True
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        promql_parser.parse_duration(endpoint["interval"])
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in {p["name"] for p in container["ports"]}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_manifests() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "kubernetes")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    rendered = list(yaml.safe_load_all(result.stdout))
    assert {f"{d['kind']}/{d['metadata']['name']}" for d in rendered} == set(_manifests())


# ---- Prometheus rules and the Grafana dashboard


def _metrics_in(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects; a ValueError if it does not parse."""
    names: set[str] = set()
    unnamed: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            else:
                unnamed.append(str(node))

    promql_parser.walk(promql_parser.parse(expr), visit)
    assert not unnamed, f"select series by name so the contract check sees them: {unnamed}"
    return names


def _grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return labels


def _rules() -> list[dict[str, Any]]:
    document = _yaml(DEPLOY / "prometheus" / "alerts.yml")
    assert set(document) == {"groups"}
    names = [group["name"] for group in document["groups"]]
    assert len(names) == len(set(names))
    return [rule for group in document["groups"] for rule in group["rules"]]


def _headings(markdown: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    anchors = set()
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_alert_rules_are_well_formed_and_documented() -> None:
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    anchors = _headings(OPERATIONS)
    for rule in rules:
        name = rule["alert"]
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert re.fullmatch(r"CdcAudit[A-Z][A-Za-z]+", name)
        if "for" in rule:
            promql_parser.parse_duration(rule["for"])
        assert rule["labels"]["severity"] in {"critical", "warning"}
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations)
        assert annotations["runbook"] == f"docs/operations.md#{name.lower()}"
        assert name.lower() in anchors, f"docs/operations.md has no section {name}"
        for text in annotations.values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in _grouping_labels(rule["expr"]), (
                    f"{name}: {{{{ $labels.{label} }}}} is aggregated away by the expression"
                )


def test_alert_rules_cover_what_operators_must_hear_about() -> None:
    used = set().union(*(_metrics_in(rule["expr"]) for rule in _rules()))
    for metric in (
        "cdc_audit_lag_seconds",
        "cdc_audit_gap_events",
        "cdc_audit_events_missing_context_total",
        "cdc_audit_last_verify_ok",
        "cdc_audit_last_checkpoint_timestamp_seconds",
        "cdc_audit_slot_retained_wal_bytes",
        "cdc_audit_slot_lost",
    ):
        assert metric in used, f"no alert on {metric}"


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r["alert"])
def test_alert_expressions_parse_and_use_only_contract_metrics(rule: dict[str, Any]) -> None:
    try:
        used = _metrics_in(rule["expr"])
    except ValueError as exc:
        pytest.fail(f"{rule['alert']}: {exc}")
    assert used, "an alert must select at least one series"
    assert used <= CONTRACT_METRICS, f"not in the metrics contract: {used - CONTRACT_METRICS}"


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(
        (DEPLOY / "grafana" / "dashboard.json").read_text(encoding="utf-8")
    )
    return dashboard


# Grafana's own variables, replaced by what Grafana would put there before PromQL sees them.
GRAFANA_GLOBALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def _substitute(expr: str, variables: set[str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name in GRAFANA_GLOBALS:
            return GRAFANA_GLOBALS[name]
        assert name in variables, f"unknown dashboard variable ${name} in {expr}"
        return ".*"

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def test_dashboard_layout_and_data_source() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the dashboard"
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))


def test_dashboard_queries_parse_and_show_every_contract_metric() -> None:
    dashboard = _dashboard()
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    shown: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = _substitute(target["expr"], variables)
            try:
                shown |= _metrics_in(expr)
            except ValueError as exc:
                pytest.fail(f"panel {panel['title']!r}: {exc}: {expr}")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            shown.add(match[1])
    assert shown <= CONTRACT_METRICS, f"not in the metrics contract: {shown - CONTRACT_METRICS}"
    assert shown == CONTRACT_METRICS, f"no panel shows {CONTRACT_METRICS - shown}"


# ---- documentation


def test_deployment_guide_is_linked_and_its_links_resolve() -> None:
    assert "docs/operations.md" in (ROOT / "README.md").read_text(encoding="utf-8")
    for page in (DEPLOY / "README.md", OPERATIONS):
        text = page.read_text(encoding="utf-8")
        for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", text):
            linked = page.parent / target if target else page
            assert linked.exists(), f"{page.name}: broken link {target}"
            if anchor:
                assert anchor in _headings(linked), f"{page.name}: no section #{anchor} in {target}"
    assert "../docs/operations.md" in (DEPLOY / "README.md").read_text(encoding="utf-8")
