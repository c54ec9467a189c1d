from __future__ import annotations

import pytest

from homeiot.core.errors import InvalidDataError
from homeiot.core.passwords import hash_password, password_file_line, verify_password

# Made by Debian's mosquitto_passwd 2.0.11 for the password "s3cret".
MOSQUITTO_HASH = ("$7$101$lEUHikyinDizxPip$xTMBqw5bri+2vdTqdmmhoUa0jl3QVSeIVhqQltAVNNZK+JxOd+9zGlqR"
                  "q7MohtvKMAmMq6Mju+aN4olANfr1zA==")


def test_verifies_a_hash_made_by_mosquitto_passwd() -> None:
    assert verify_password("s3cret", MOSQUITTO_HASH)
    assert not verify_password("s3cret!", MOSQUITTO_HASH)


def test_known_answer_with_fixed_salt() -> None:
    salt = b"\x94E\x07\x8aL\xa2\x9c8\xb3\xc4\xf8\xa9"  # the salt of MOSQUITTO_HASH
    assert hash_password("s3cret", salt=salt) == MOSQUITTO_HASH


def test_random_salts_differ_and_verify() -> None:
    first, second = hash_password("pw"), hash_password("pw")
    assert first != second
    assert first.startswith("$7$101$")
    assert verify_password("pw", first)
    assert verify_password("pw", second)


@pytest.mark.parametrize("encoded", ["", "$6$abc$def", "$7$x$AAAA$BBBB", "$7$101$!!$AAAA",
                                     "$7$101$AAAA$AAAA", "plain"])
def test_malformed_hashes_do_not_verify(encoded: str) -> None:
    assert not verify_password("pw", encoded)


def test_password_file_line_checks_the_user() -> None:
    assert password_file_line("gw", "$7$x") == "gw:$7$x"
    for bad in ("", "a:b", "a\nb"):
        with pytest.raises(InvalidDataError):
            password_file_line(bad, "$7$x")
    with pytest.raises(InvalidDataError):
        hash_password("")
