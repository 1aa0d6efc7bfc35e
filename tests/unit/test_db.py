"""The worker's connections notice a vanished peer: TCP keepalives unless the DSN says otherwise."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from cdc_audit.db import with_keepalives
from cdc_audit.errors import InvalidInput


def test_keepalives_are_added_and_the_dsn_keeps_its_own_settings() -> None:
    dsn = with_keepalives("postgresql://ann:p%20w@db.example:6432/shop?keepalives_idle=5")
    assert conninfo_to_dict(dsn) == {
        "user": "ann",
        "password": "p w",
        "host": "db.example",
        "port": "6432",
        "dbname": "shop",
        "keepalives": "1",
        "keepalives_idle": "5",
        "keepalives_interval": "10",
        "keepalives_count": "3",
    }


def test_a_dsn_that_turns_keepalives_off_is_obeyed() -> None:
    assert conninfo_to_dict(with_keepalives("host=h keepalives=0"))["keepalives"] == "0"


def test_an_invalid_dsn_is_a_one_line_error() -> None:
    with pytest.raises(InvalidInput, match=r"^invalid DSN: "):
        with_keepalives("host=h nonsense")
