"""The pure side of privilege snapshots: canonical state, digest, diff and descriptions."""

from __future__ import annotations

from typing import Any

from cdc_audit import privileges
from cdc_audit.drift import Finding, drift_event
from cdc_audit.privileges import baseline, canonical_state, describe, diff, digest


def role(name: str, **attributes: Any) -> dict[str, Any]:
    defaults = {
        "superuser": False,
        "inherit": True,
        "createrole": False,
        "createdb": False,
        "login": False,
        "replication": False,
        "bypassrls": False,
        "connection_limit": -1,
        "valid_until": None,
        "config": [],
    }
    return {"role": name, **defaults, **attributes}


def member(role_name: str, member_name: str, admin: bool = False) -> dict[str, Any]:
    return {
        "role": role_name,
        "member": member_name,
        "grantor": "postgres",
        "admin_option": admin,
    }


def grant(obj: str, grantee: str, privilege: str, grantable: bool = False) -> dict[str, Any]:
    return {
        "object_type": "table",
        "object": obj,
        "grantee": grantee,
        "grantor": "postgres",
        "privilege": privilege,
        "grantable": grantable,
    }


BEFORE = canonical_state(
    [role("postgres", superuser=True, login=True), role("carol"), role("temp")],
    [member("cdc_audit_writer", "worker")],
    [grant("public.accounts", "app", "SELECT")],
)


def test_equal_states_have_equal_digests_whatever_the_order() -> None:
    shuffled = canonical_state(
        list(reversed(BEFORE["roles"])),
        list(BEFORE["memberships"]),
        list(reversed(BEFORE["privileges"])),
    )
    assert shuffled == BEFORE
    assert digest(shuffled) == digest(BEFORE)
    assert [r["role"] for r in BEFORE["roles"]] == ["carol", "postgres", "temp"]
    assert len(digest(BEFORE)) == 64


def test_no_difference_no_change() -> None:
    assert diff(BEFORE, BEFORE) == []


def test_each_kind_of_change_is_one_entry_in_a_stable_order() -> None:
    after = canonical_state(
        [
            role("postgres", superuser=True, login=True),
            role("carol", createdb=True, connection_limit=3),
            role("bob", login=True),
        ],
        [member("cdc_audit_writer", "worker", admin=True), member("cdc_audit_reader", "bob")],
        [grant("public.accounts", "bob", "SELECT"), grant("public.accounts", "app", "SELECT")],
    )
    changes = diff(BEFORE, after)
    assert [c["change"] for c in changes] == [
        "role_created",
        "role_altered",
        "role_dropped",
        "membership_granted",
        "membership_altered",
        "privilege_granted",
    ]
    created, altered, dropped, granted, admin, privilege = changes
    assert created == {"change": "role_created", **role("bob", login=True)}
    assert altered == {
        "change": "role_altered",
        "role": "carol",
        "before": {"connection_limit": -1, "createdb": False},
        "after": {"connection_limit": 3, "createdb": True},
    }
    assert dropped["role"] == "temp"
    assert granted == {"change": "membership_granted", **member("cdc_audit_reader", "bob")}
    assert admin["before"] == {"admin_option": False}
    assert admin["after"] == {"admin_option": True}
    assert (admin["role"], admin["member"], admin["grantor"]) == (
        "cdc_audit_writer",
        "worker",
        "postgres",
    )
    assert privilege == {"change": "privilege_granted", **grant("public.accounts", "bob", "SELECT")}


def test_revocations_and_the_grant_option() -> None:
    after = canonical_state(
        BEFORE["roles"], [], [grant("public.accounts", "app", "SELECT", grantable=True)]
    )
    changes = diff(BEFORE, after)
    assert [c["change"] for c in changes] == ["membership_revoked", "privilege_altered"]
    assert changes[1]["before"] == {"grantable": False}
    assert changes[1]["after"] == {"grantable": True}


def test_a_field_new_to_the_state_shows_as_altered() -> None:
    """PostgreSQL 16 adds inherit and set options to memberships: absent reads as None."""
    after = canonical_state(
        BEFORE["roles"],
        [member("cdc_audit_writer", "worker") | {"inherit_option": True}],
        BEFORE["privileges"],
    )
    (change,) = diff(BEFORE, after)
    assert change["before"] == {"inherit_option": None}


def test_descriptions_name_who_and_what() -> None:
    after = canonical_state(
        [role("postgres", superuser=True, login=True), role("carol", createdb=True)],
        [member("cdc_audit_writer", "worker", admin=True), member("cdc_audit_reader", "bob")],
        [grant("public.accounts", "PUBLIC", "SELECT", grantable=True)],
    )
    lines = [describe(change) for change in diff(BEFORE, after)]
    assert lines == [
        "role altered: carol: createdb false -> true",
        "role dropped: temp",
        "membership granted: bob in cdc_audit_reader (by postgres)",
        "membership altered: worker in cdc_audit_writer (by postgres): admin_option false -> true",
        "privilege granted: SELECT on table public.accounts to PUBLIC (by postgres)"
        " with grant option",
        "privilege revoked: SELECT on table public.accounts to app (by postgres)",
    ]
    assert describe({"change": "role_created", **role("x", login=True, superuser=True)}) == (
        "role created: x (superuser, login)"
    )


def test_the_baseline_is_counts_not_entries() -> None:
    first = baseline(BEFORE, digest(BEFORE))
    assert first == {
        "change": "baseline",
        "roles": 3,
        "memberships": 1,
        "privileges": 1,
        "snapshot": digest(BEFORE),
    }
    assert describe(first) == "privilege baseline: 3 role(s), 1 membership(s), 1 privilege(s)"


def test_event_content_keys_survive_the_worker() -> None:
    """Keys the worker strips as context or bookkeeping must never carry a change's facts."""
    stripped = {"v", "stream", "generation", "db", "actor_id", "actor_role", "reason", "kind"}
    for section in privileges.SECTIONS:
        assert not set(section.key) & stripped
    entries = [*BEFORE["roles"], *BEFORE["memberships"], *BEFORE["privileges"]]
    assert not {key for entry in entries for key in entry} & stripped


def test_drift_events_say_what_appeared_and_what_was_resolved() -> None:
    old = [Finding("trigger_disabled", "public.a", "x"), Finding("slot_missing", "s", "y")]
    new = [Finding("slot_missing", "s", "y"), Finding("not_published", "public.b", "z")]
    event = drift_event(old, new, 7)
    assert event["kind"] == "drift"
    assert event["policy_version_id"] == 7
    assert [f["code"] for f in event["findings"]] == ["slot_missing", "not_published"]
    assert event["appeared"] == [{"code": "not_published", "object": "public.b", "message": "z"}]
    assert event["resolved"] == [{"code": "trigger_disabled", "object": "public.a", "message": "x"}]
    assert Finding("a", "b", "c", about="t") == Finding("a", "b", "c")
    assert Finding("a", "b", "c").line == "b: c"
