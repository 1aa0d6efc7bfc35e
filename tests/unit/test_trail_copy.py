"""COPY text lines for sealed events: every field escaped so no value can split a row."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from cdc_audit.chain import DraftEvent, StreamChain
from cdc_audit.trail import EVENT_COLUMNS, CopyEncoder, copy_row


def _unescape(field: bytes) -> str | None:
    """PostgreSQL's reading of one COPY text field (the escapes copy_row produces)."""
    if field == b"\\N":
        return None
    out, i, text = [], 0, field.decode()
    names = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}
    while i < len(text):
        if text[i] == "\\":
            out.append(names[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _draft(**fields: object) -> DraftEvent:
    base: dict[str, object] = {
        "stream": "user",
        "kind": "update",
        "event_id": uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057"),
        "commit_lsn": 0x16_B374D848,
        "commit_time": datetime(2026, 11, 28, 7, 0, 1, 5, tzinfo=UTC),
        "xid": 742,
        "schema_name": "public",
        "table_name": "accounts",
    }
    base.update(fields)
    return DraftEvent(**base)  # type: ignore[arg-type]


HOSTILE = "tab\there\nnew\rcr \\ back \" quote ' \u2028 \\N"


def test_every_field_of_a_hostile_event_reads_back_as_it_was() -> None:
    draft = _draft(
        actor_id=HOSTILE,
        reason=HOSTILE,
        table_name=HOSTILE,
        row_key={"id": 1},
        new={"note": HOSTILE},
        changed=("a,b", 'q"uote', "back\\slash", HOSTILE),
        context={"trace": HOSTILE},
    )
    sealed = StreamChain("user").seal(draft)
    line = copy_row(sealed)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    fields = [_unescape(f) for f in line[:-1].split(b"\t")]
    assert len(fields) == len(EVENT_COLUMNS)
    row = dict(zip(EVENT_COLUMNS, fields, strict=True))
    assert row["actor_id"] == HOSTILE and row["reason"] == HOSTILE
    assert row["table_name"] == HOSTILE
    assert row["commit_lsn"] == "16/B374D848"
    assert row["commit_time"] == "2026-11-28T07:00:01.000005+00:00"
    assert row["event_id"] == "01890a5d-ac96-774b-bcce-b302099a8057"
    assert row["new"] == '{"note":"tab\\there\\nnew\\rcr \\\\ back \\" quote \' \u2028 \\\\N"}'
    hostile_element = HOSTILE.replace("\\", "\\\\").replace('"', '\\"')
    assert row["changed"] == f'{{"a,b","q\\"uote","back\\\\slash","{hostile_element}"}}'
    assert row["hash"] == "\\x" + sealed.hash.hex()
    assert row["old"] is None and row["context_missing"] == "f"


def test_one_encoder_gives_the_same_lines_as_fresh_ones() -> None:
    chain = StreamChain("user")
    shared_context = {"actor": "a"}
    events = [
        chain.seal(_draft(row_key={"id": i}, context=shared_context, actor_id="a"))
        for i in range(3)
    ]
    encoder = CopyEncoder()
    assert [encoder.row(e) for e in events] == [copy_row(e) for e in events]
