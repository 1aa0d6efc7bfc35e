"""The command line as users and scripts see it: output, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def cdc_audit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_audit.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )


def test_check_accepts_a_valid_policy() -> None:
    result = cdc_audit("check", "--policy", str(GOLDEN / "full_policy.yaml"))
    assert result.returncode == 0, result.stderr
    assert "ok: 2 stream(s), 3 table(s), schema cdc_audit" in result.stdout


def test_check_reads_the_policy_from_the_environment(tmp_path: Path) -> None:
    env = {"CDC_AUDIT_POLICY": str(GOLDEN / "minimal_policy.yaml"), "PATH": "/usr/bin:/bin"}
    result = cdc_audit("check", env=env)
    assert result.returncode == 0, result.stderr


def test_policy_errors_are_one_line_each_with_file_line_and_key(tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text(
        "version: 1\n"
        "streams:\n"
        "  user: {retention: 10 days}\n"
        "tables:\n"
        "  - table: public.accounts\n"
        "    stream: usr\n"
        "    when: \"status = 'x'; DROP TABLE accounts\"\n"
    )
    result = cdc_audit("check", "--policy", str(policy))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith(f"cdc-audit: {policy}:") for line in lines)
    text = result.stderr
    assert f"{policy}:3: streams.user.retention:" in text
    assert f"{policy}:6: tables[0].stream: unknown stream 'usr'" in text
    assert f"{policy}:7: tables[0].when:" in text


def test_malformed_yaml_is_a_clear_error(tmp_path: Path) -> None:
    policy = tmp_path / "broken.yaml"
    policy.write_text("version: 1\nstreams: {user: [\n")
    result = cdc_audit("check", "--policy", str(policy))
    assert result.returncode == 2
    assert result.stderr.startswith(f"cdc-audit: {policy}:")
    assert "Traceback" not in result.stderr


def test_missing_policy_file_and_missing_arguments() -> None:
    result = cdc_audit("check", "--policy", "/nonexistent/policy.yaml")
    assert result.returncode == 2
    assert "/nonexistent/policy.yaml" in result.stderr
    result = cdc_audit("check", env={"PATH": "/usr/bin:/bin"})
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "cdc-audit: no policy given: use --policy FILE or set CDC_AUDIT_POLICY",
    )
    result = cdc_audit("frobnicate")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_plan_without_a_database_says_how_to_give_one() -> None:
    result = cdc_audit(
        "plan", "--policy", str(GOLDEN / "minimal_policy.yaml"), env={"PATH": "/usr/bin:/bin"}
    )
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "cdc-audit: no database given: use --dsn or set CDC_AUDIT_DSN",
    )


def test_invalid_settings_in_the_environment_are_input_errors() -> None:
    env = {"CDC_AUDIT_METRICS_PORT": "not-a-port", "PATH": "/usr/bin:/bin"}
    result = cdc_audit("check", "--policy", str(GOLDEN / "minimal_policy.yaml"), env=env)
    assert result.returncode == 2
    assert "CDC_AUDIT_METRICS_PORT" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
