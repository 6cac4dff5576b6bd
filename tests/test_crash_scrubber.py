"""The scrubbing steps alone and in the chain; value patterns; envelopes; the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crashreports.envelope import EnvelopeError, parse_envelope
from crashreports.patterns import ValuePatterns, iban_ok, luhn_ok
from crashreports.scrubber import (
    DropEvent,
    FilterKeys,
    KeepTopLevel,
    LimitDepth,
    RemoveIdentifying,
    RequireOptIn,
    ScrubTree,
    ScrubValues,
    compile_chain,
    sensitive_keys,
)
from crashreports.settings import parse_crashreports, parse_dsn
from tomlsections.reader import ConfigError, Section

PATTERNS = ValuePatterns()


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("mail alice.smith@example.com now", "mail [email] now"),
        ("sip:alice@pbx.example.com;transport=tcp", "sip:[sip-user]@pbx.example.com;transport=tcp"),
        ("<sips:bob:pw@pbx.example.com>", "<sips:[sip-user]@pbx.example.com>"),
        ("tel:+49-151-1234567", "tel:[phone]"),
        ("from 192.168.10.20:5060", "from [ip]:5060"),
        ("v6 2001:db8::7 and fe80::1%eth0", "v6 [ip] and [ip]"),
        ("call +49 151 12345678", "call [phone]"),
        ("call 0151 12345678", "call [phone]"),
        ("phone:0151 98765432", "phone:[phone]"),
        ("call (555) 123-4567", "call [phone]"),
        ("card 4111-1111-1111-1111", "card [card]"),
        ("imei 490154203237518", "imei [imei]"),
        ("iban DE89 3704 0044 0532 0130 00", "iban [iban]"),
        ("Authorization: Bearer abcdefghijklmnop", "Authorization: Bearer [token]"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abcdef", "jwt [jwt]"),
        ("push " + "a1" * 32, "push [apns-token]"),
        ("fcm dKx0abcdefghijk:APA91" + "b" * 120, "fcm [fcm-token]"),
        ("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----", "[pem]"),
        ("https://u:p@host/x?token=abc&x=1", "https://[userinfo]@host/x?token=[filtered]&x=1"),
        ("token=abc&lang=de", "token=[filtered]&lang=de"),
        ("/home/alice/app/main.py", "/home/[user]/app/main.py"),
        ("/Users/carol/Library/x", "/Users/[user]/Library/x"),
        ("C:\\Users\\Bob\\x.py", "C:\\Users\\[user]\\x.py"),
        ("mac 00:1A:2B:3C:4D:5E", "mac [mac]"),
    ],
)
def test_each_value_pattern_replaces_its_kind_with_a_typed_placeholder(
    text: str, scrubbed: str
) -> None:
    assert PATTERNS.sub(text) == scrubbed


@pytest.mark.parametrize(
    "kept",
    [
        "std::vec::Vec at 12:30:45",
        "2026-03-01T12:00:00Z",
        "2026-11-22T09:09:07.737849Z",  # seconds 00-09 once looked like a national number
        "com.example.phone@2.4.1",
        "version 2.4.1 build 1234",
        "ts 1772366400000",  # 13 digits that fail Luhn: a time, not a card
        "sip:pbx.example.com",  # no user part
        "line 4711 in module phone.calls",
    ],
)
def test_what_is_not_personal_data_is_kept(kept: str) -> None:
    assert PATTERNS.sub(kept) == kept


def test_checksums_of_cards_and_ibans() -> None:
    assert luhn_ok("4111111111111111")
    assert not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00")
    assert not iban_ok("DE88 3704 0044 0532 0130 00")


def test_require_opt_in_drops_without_the_tag_and_reads_both_tag_forms() -> None:
    step = RequireOptIn("softrelay.opt_in", "yes")
    assert step({"tags": {"softrelay.opt_in": "yes"}})
    assert step({"tags": [["softrelay.opt_in", "yes"]]})
    for event in ({}, {"tags": {"softrelay.opt_in": "no"}}, {"tags": "x"}):
        with pytest.raises(DropEvent) as caught:
            step(event)
        assert caught.value.reason == "no_opt_in"


def test_limit_depth_cuts_deep_nesting() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(100):
        node["x"] = {}
        node = node["x"]
    cut = LimitDepth(3)({"a": deep})
    assert cut == {"a": {"x": {"x": "[filtered]"}}}


def test_keep_top_level_drops_unknown_keys() -> None:
    assert KeepTopLevel()({"message": "m", "user": {"id": 1}, "whatever": 1}) == {"message": "m"}


def test_remove_identifying_fields() -> None:
    event = {
        "server_name": "h",
        "request": {"data": "body", "cookies": "c", "url": "u"},
        "extra": {"sys.argv": ["a"], "ok": 1},
        "contexts": {"device": {"name": "Alice's phone", "model": "Pixel 8"}},
    }
    assert RemoveIdentifying()(event) == {
        "request": {"url": "u"},
        "extra": {"ok": 1},
        "contexts": {"device": {"model": "Pixel 8"}},
    }


def test_filter_keys_matches_substrings_and_variants_in_every_nested_mapping() -> None:
    step = FilterKeys(sensitive_keys())
    event = {
        "extra": {"a": [{"X-Auth-Token": "t", "userPassword": "p", "api-key": "k"}]},
        "frames": [{"vars": {"private_key": "k", "Session-Id": "s", "count": 3, "digest": ""}}],
        "kept": {"model": "Pixel 8"},
    }
    assert step(event) == {
        "extra": {
            "a": [
                {
                    "X-Auth-Token": "[filtered]",
                    "userPassword": "[filtered]",
                    "api-key": "[filtered]",
                }
            ]
        },
        "frames": [
            {
                "vars": {
                    "private_key": "[filtered]",
                    "Session-Id": "[filtered]",
                    "count": 3,
                    "digest": "",
                }
            }
        ],
        "kept": {"model": "Pixel 8"},
    }


def test_scrub_values_reaches_keys_and_values_and_keeps_the_shape() -> None:
    step = ScrubValues(PATTERNS)
    event = {"extra": {"bob@example.com": ["x\x00y", 1, None, {"ip": "10.1.2.3"}]}}
    assert step(event) == {"extra": {"[email]": ["x\ufffdy", 1, None, {"ip": "[ip]"}]}}


def _nested(depth: int, leaf: Any) -> Any:
    for i in range(depth):
        leaf = {f"k{i}": leaf} if i % 2 else [leaf]
    return leaf


# Every kind of value, in keys and values, at every depth, sensitive keys with empty
# values, NUL in keys and values, keys that scrub to the same placeholder.
TREE_EVENT: dict[str, Any] = {
    "message": "REGISTER sip:bob@pbx.example.com from 10.0.0.1 for bob@example.com",
    "extra": {
        "a\x00b": "c\x00d",
        "bob@example.com": {"note": "+49 151 2345678 and Bearer abcdefghijk"},
        "carol@example.com": 2,
        "[email]": 3,
        "1.2.3.4": "ok",
        "list": ["0151 98765432", "std::vec", "::", 1, None, 2.5, True, ["192.168.1.1"]],
        "secrets": {"password": "x", "pwd": "", "token": None, "auth": {"a": 1}},
        "deep": _nested(30, "alice@example.com"),
        "text": "DE89 3704 0044 0532 0130 00, 4111-1111-1111-1111, 490154203237518, "
        + "ab" * 32
        + ", 00:1A:2B:3C:4D:5E https://u:p@h/x?token=abc&x=1 C:\\Users\\Bob\\x "
        "/Users/carol/x tel:+49-151-1234567 (555) 123-4567 fe80::1%eth0 "
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abcdef version 2.4.1 at 12:30:45",
    },
    "breadcrumbs": {"values": [{"message": f"call {n} to +49 151 2345678"} for n in range(3)]},
}


def test_scrub_tree_is_the_depth_key_and_value_steps_in_one_walk() -> None:
    import copy

    sensitive = sensitive_keys()
    in_turn = ScrubValues(PATTERNS)(FilterKeys(sensitive)(LimitDepth()(copy.deepcopy(TREE_EVENT))))
    at_once = ScrubTree(sensitive, PATTERNS)(copy.deepcopy(TREE_EVENT))
    assert at_once == in_turn
    assert list(at_once["extra"]) == list(in_turn["extra"])  # the keys' order too
    assert "alice@example.com" not in repr(at_once)
    assert at_once["extra"]["[email]"] == 3  # two keys scrubbed to one: the last value


def test_sub_each_returns_what_sub_returns_for_the_texts_it_changes() -> None:
    texts = [
        "plain words",
        "mail alice@example.com",
        "0",
        "2.75.0",
        "call +49 151 12345678",
        "call +49 151 12345678",
        "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----",
        "/home/alice/x",
    ]
    changed = PATTERNS.sub_each(texts)
    assert changed == {i: PATTERNS.sub(t) for i, t in enumerate(texts) if PATTERNS.sub(t) != t}
    assert sorted(changed) == [1, 4, 5, 6, 7]


def test_spans_too_short_or_without_the_characters_a_rule_needs_skip_it_only() -> None:
    # The features only skip rules that cannot match: the full alternation agrees.
    for text in (
        "0",
        "19",
        "2.75.0",
        "1.2.3.4",
        "tel:1234",
        "a@b.cd",
        "::",
        "/home/x",
        "/Users/x",
        "C:\\Users\\x\\y",
        "c:\\users\\x",
        "+4915112",
        "0151 9876543",
        "token=x",
        "x:y@z",
        "4111111111111111",
    ):
        assert PATTERNS.sub(text) == PATTERNS.sub_all_rules(text), text


def test_the_chain_runs_every_step_and_a_deployments_own_rules() -> None:
    chain = compile_chain(
        opt_in=RequireOptIn("consent", "1"),
        extra_keys=("pin",),
        extra_patterns=(r"CUST-\d{6}",),
    )
    event = {
        "tags": {"consent": "1"},
        "user": {"email": "a@example.com"},
        "extra": {"pin": "1234", "note": "customer CUST-123456 at a@example.com"},
        "unknown": "dropped",
    }
    assert chain(event) == {
        "tags": {"consent": "1"},
        "extra": {"pin": "[filtered]", "note": "customer [filtered] at [email]"},
    }


def test_envelopes_parse_with_and_without_lengths() -> None:
    body = b'{"event_id":"x"}\n{"type":"event","length":2}\n{}\n{"type":"session"}\n{"a":1}\n'
    envelope = parse_envelope(body)
    assert envelope.headers == {"event_id": "x"}
    assert [(i.type, i.payload) for i in envelope.items] == [
        ("event", b"{}"),
        ("session", b'{"a":1}'),
    ]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty envelope"),
        (b"[]\n", "envelope header is not a JSON object"),
        (b"{}\n{}\n", "item 1 header has no type"),
        (
            b'{}\n{"type":"event","length":-1}\n',
            "item 1 header: length must be a non-negative integer",
        ),
        (b'{}\n{"type":"event","length":5}\n{}', "item 1 header: length 5 runs past the end"),
    ],
)
def test_malformed_envelopes_name_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError, match=reason):
        parse_envelope(body)


def _parse(table: dict[str, Any]) -> Any:
    return parse_crashreports(Section(table, Path("softrelay.toml"), "crashreports"))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"project": [{"id": "abc", "key": "k" * 32}]},
            "crashreports.project[0].id: must be digits",
        ),
        ({"project": [{"id": "1", "key": "short"}]}, "crashreports.project[0].key: must be 16"),
        ({"project": [{"id": "1", "key": "k" * 32, "opt_in": "maybe"}]}, "opt_in: must be one of"),
        (
            {"scrub_patterns": ["("]},
            "crashreports.scrub_patterns: '(' is not an RE2 regular expression",
        ),
        ({"scrub_patterns": ["(a)"]}, "use (?:...) instead of groups"),
        ({"forward": {"dsn": "not a dsn"}}, "crashreports.forward.dsn: expected a DSN"),
        ({"attachments": "keep"}, "crashreports.attachments: must be one of refuse, drop"),
        ({"rate_limitt": 5}, "crashreports.rate_limitt: unknown key"),
    ],
)
def test_a_bad_configuration_names_file_and_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse(table)
    assert str(caught.value).startswith("softrelay.toml: crashreports")
    assert message in str(caught.value)


def test_a_dsn_splits_into_the_envelope_url_and_key() -> None:
    upstream = parse_dsn("https://abc123@o1.ingest.example.com/sentry/42")
    assert upstream.envelope_url == "https://o1.ingest.example.com/sentry/api/42/envelope/"
    assert upstream.public_key == "abc123"


def test_texts_found_clean_are_skipped_later_and_nothing_changed_is_remembered() -> None:
    patterns = ValuePatterns()
    texts = ["plain words", "mail alice@example.com", "2.75.0", "/home/alice/x", "x" * 600]
    first = patterns.sub_each(texts)
    assert sorted(first) == [1, 3]
    # Only the clean texts of bounded length are remembered; a text a rule changed is not.
    assert patterns._clean == {"plain words", "2.75.0"}
    # The next event mixes remembered and new texts: the same answer, by the right index.
    again = ["2.75.0", "call +49 151 12345678", "plain words", "mail alice@example.com"]
    assert patterns.sub_each(again) == {
        i: PATTERNS.sub(t) for i, t in enumerate(again) if i in (1, 3)
    }
    assert patterns.sub_each(["plain words", "2.75.0"]) == {}


def test_the_key_decisions_kept_across_events_still_filter_each_event() -> None:
    tree = ScrubTree(sensitive_keys(), PATTERNS)
    for _ in range(2):  # the second event's keys are all remembered
        out = tree({"extra": {"auth_token": "abc", "release": "1.0", "k" * 200: "v"}})
        assert out == {"extra": {"auth_token": "[filtered]", "release": "1.0", "k" * 200: "v"}}
    assert tree.keys == {"extra": False, "auth_token": True, "release": False}


def test_spans_found_clean_are_remembered_and_only_those() -> None:
    patterns = ValuePatterns()
    text = "at 12:30:45 mail alice@example.com"
    assert patterns.sub(text) == "at 12:30:45 mail [email]"
    assert patterns._clean_spans == {b"12:30:45"}
    # A remembered span in another text: still kept, the new spans still scrubbed.
    assert patterns.sub("12:30:45 tel:+4930123456") == "12:30:45 tel:[phone]"
    assert patterns.sub_all_rules("12:30:45 tel:+4930123456") == "12:30:45 tel:[phone]"
