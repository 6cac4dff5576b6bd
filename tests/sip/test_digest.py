"""PBX digest authentication: the right secret passes, anything else is refused, and a
nonce is bound to its serial, its flow and its age, and is answered once."""

from __future__ import annotations

import pytest

from proxy.sip.digest import (
    Credentials,
    DigestAuthority,
    DigestError,
    MalformedAuthorization,
    StaleNonce,
    parse_authorization,
    response,
)
from tests import digest_vectors
from tests.digest_vectors import Vector

NOW = 1_800_000_000.0


@pytest.mark.parametrize("vector", digest_vectors.ALL, ids=lambda v: v.source)
def test_response_matches_the_rfc_examples(vector: Vector) -> None:
    """The relay's digest against the answers printed in the RFCs, not against itself."""
    creds = Credentials(
        vector.username,
        vector.realm,
        vector.nonce,
        vector.uri,
        "",
        vector.algorithm,
        vector.qop,
        vector.nc,
        vector.cnonce,
    )
    assert response(creds, vector.password, vector.method) == vector.response


@pytest.mark.parametrize("vector", digest_vectors.ALL, ids=lambda v: v.source)
def test_the_rfc_authorization_headers_parse_to_their_parameters(vector: Vector) -> None:
    creds = parse_authorization(vector.authorization)
    assert creds == Credentials(
        vector.username,
        vector.realm,
        vector.nonce,
        vector.uri,
        vector.response,
        vector.algorithm,
        vector.qop,
        vector.nc,
        vector.cnonce,
    )


def _answer(challenge: str, serial: str, secret: str, *, algorithm: str = "SHA-256") -> str:
    nonce = challenge.split('nonce="')[1].split('"')[0]
    creds = Credentials(
        serial, "relay.test", nonce, "sip:relay.test", "", algorithm, "auth", "00000001", "c0ffee"
    )
    digest = response(creds, secret, "REGISTER")
    return (
        f'Digest username="{serial}", realm="relay.test", nonce="{nonce}", '
        f'uri="sip:relay.test", response="{digest}", algorithm={algorithm}, qop=auth, '
        f'nc=00000001, cnonce="c0ffee"'
    )


def test_right_secret_passes_and_wrong_secret_fails() -> None:
    authority = DigestAuthority("relay.test")
    challenge = authority.challenge("0042137", NOW)
    authority.verify(
        _answer(challenge, "0042137", "s3cret"), "0042137", "s3cret", "REGISTER", NOW + 1
    )
    with pytest.raises(DigestError, match="wrong response"):
        authority.verify(
            _answer(challenge, "0042137", "guess"), "0042137", "s3cret", "REGISTER", NOW + 1
        )


def test_nonce_of_one_serial_does_not_work_for_another() -> None:
    authority = DigestAuthority("relay.test")
    challenge = authority.challenge("0042137", NOW)
    forged = _answer(challenge, "0099999", "other")
    with pytest.raises(DigestError, match="nonce not ours"):
        authority.verify(forged, "0099999", "other", "REGISTER", NOW + 1)


def test_old_nonce_is_stale() -> None:
    authority = DigestAuthority("relay.test")
    challenge = authority.challenge("0042137", NOW)
    with pytest.raises(StaleNonce):
        authority.verify(
            _answer(challenge, "0042137", "s3cret"), "0042137", "s3cret", "REGISTER", NOW + 301
        )


def test_md5_answers_are_accepted_like_rfc_2617() -> None:
    authority = DigestAuthority("relay.test")
    challenge = authority.challenge("0042137", NOW)
    answer = _answer(challenge, "0042137", "s3cret", algorithm="MD5")
    authority.verify(answer, "0042137", "s3cret", "REGISTER", NOW)
    assert "algorithm=MD5" in answer


@pytest.mark.parametrize(
    "header",
    ["Basic abc", "Digest username=", 'Digest username="0042137"', "Digest ,,,", ""],
)
def test_malformed_headers_are_refused(header: str) -> None:
    with pytest.raises(DigestError):
        DigestAuthority("relay.test").verify(header, "0042137", "s3cret", "REGISTER", NOW)


def test_a_nonce_is_answered_once() -> None:
    authority = DigestAuthority("relay.test")
    answer = _answer(authority.challenge("0042137", NOW, flow=b"#1"), "0042137", "s3cret")
    authority.verify(answer, "0042137", "s3cret", "REGISTER", NOW + 1, flow=b"#1")
    with pytest.raises(StaleNonce, match="used before"):
        authority.verify(answer, "0042137", "s3cret", "REGISTER", NOW + 2, flow=b"#1")


def test_a_nonce_works_only_on_the_flow_it_was_issued_on() -> None:
    """Captured and replayed from another connection: a new challenge (stale), which
    only the holder of the secret can answer; with a wrong secret, just wrong."""
    authority = DigestAuthority("relay.test")
    answer = _answer(authority.challenge("0042137", NOW, flow=b"#1"), "0042137", "s3cret")
    with pytest.raises(StaleNonce, match="nonce not ours"):
        authority.verify(answer, "0042137", "s3cret", "REGISTER", NOW + 1, flow=b"#2")
    guess = _answer(authority.challenge("0042137", NOW, flow=b"#1"), "0042137", "guess")
    with pytest.raises(DigestError, match="wrong response"):
        authority.verify(guess, "0042137", "s3cret", "REGISTER", NOW + 1, flow=b"#2")
    # Unused by the failed attempts: still good once on its own flow.
    authority.verify(answer, "0042137", "s3cret", "REGISTER", NOW + 1, flow=b"#1")


def test_the_table_of_used_nonces_is_bounded_and_forgets_what_expired() -> None:
    authority = DigestAuthority("relay.test", used_limit=3)
    answers = [
        _answer(authority.challenge("0042137", NOW + i, flow=b"#1"), "0042137", "s3cret")
        for i in range(5)
    ]
    for i, answer in enumerate(answers):
        authority.verify(answer, "0042137", "s3cret", "REGISTER", NOW + i, flow=b"#1")
        assert len(authority._used) <= 3
    # Past the lifetime every entry goes at the next verification.
    late = _answer(authority.challenge("0042137", NOW + 400, flow=b"#1"), "0042137", "s3cret")
    authority.verify(late, "0042137", "s3cret", "REGISTER", NOW + 400, flow=b"#1")
    assert len(authority._used) == 1


@pytest.mark.parametrize("field", ["response", "username", "nonce", "cnonce", "uri"])
def test_non_ascii_in_any_parameter_is_malformed_not_a_type_error(field: str) -> None:
    authority = DigestAuthority("relay.test")
    answer = _answer(authority.challenge("0042137", NOW), "0042137", "s3cret")
    start = answer.index(f'{field}="') + len(field) + 2
    tampered = answer[:start] + "\u00e9\u2603" + answer[start + 2 :]
    with pytest.raises(MalformedAuthorization):
        authority.verify(tampered, "0042137", "s3cret", "REGISTER", NOW)
