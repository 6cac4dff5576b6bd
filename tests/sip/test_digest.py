"""PBX digest authentication: the right secret passes, anything else is refused, and a
nonce is bound to its serial and its age."""

from __future__ import annotations

import pytest

from proxy.sip.digest import Credentials, DigestAuthority, DigestError, StaleNonce, response

NOW = 1_800_000_000.0


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
