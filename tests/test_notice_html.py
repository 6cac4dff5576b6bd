"""The notice as one self-contained HTML page (an app's EULA at first launch): it loads
nothing from outside, escapes every text, is a well-formed tree, and holds every section
the Markdown notice holds, in both languages."""

from __future__ import annotations

import re
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest

from privacy.notice import Controller, SupervisoryAuthority, render_notice
from privacy.policy import LANGUAGES, load_policy
from softrelay.cli import main
from tests.test_notice import CONTROLLER

PROFILES = ("auerproxy", "cloudsoftphone")
VOID = frozenset({"meta"})
# Every element the page may use: none of them fetches or runs anything.
ALLOWED = frozenset(
    {"html", "head", "meta", "title", "style", "body", "main"}
    | {"h1", "h2", "h3", "p", "ul", "li", "strong", "code", "a"}
)


class Page(HTMLParser):
    """Records the tree: tags, attributes, heading texts, all text; and nesting errors."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.declarations: list[str] = []
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str, str | None]] = []
        self.headings: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self.open: list[str] = []
        self.text: list[str] = []
        self.style: list[str] = []
        self._heading: list[str] | None = None

    def handle_decl(self, decl: str) -> None:
        self.declarations.append(decl)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [(tag, name, value) for name, value in attrs]
        if tag not in VOID:
            self.open.append(tag)
        if re.fullmatch(r"h[1-6]", tag):
            self._heading = []

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.errors.append(f"self-closing <{tag}/>")
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
            return
        self.open.pop()
        if re.fullmatch(r"h[1-6]", tag) and self._heading is not None:
            self.headings.append((int(tag[1]), "".join(self._heading)))
            self._heading = None

    def handle_data(self, data: str) -> None:
        if self.open and self.open[-1] == "style":
            self.style.append(data)
            return
        if self._heading is not None:
            self._heading.append(data)
        self.text.append(data)


def parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    assert parser.errors == []
    assert parser.open == [], "every element is closed"
    return parser


def markdown_headings(markdown: str) -> list[tuple[int, str]]:
    return [
        (len(m.group(1)), m.group(2))
        for m in re.finditer(r"^(#{1,3}) (.+)$", markdown, flags=re.MULTILINE)
    ]


def assert_self_contained(page: Page) -> None:
    assert set(page.tags) <= ALLOWED, set(page.tags) - ALLOWED
    for tag, name, value in page.attributes:
        assert name != "src", tag
        assert name != "style", "inline style only in the one <style> element"
        assert not name.startswith("on"), f"event handler {name} on <{tag}>"
        if name == "href":
            assert (value or "").startswith("mailto:"), value
    style = "".join(page.style)
    assert "url(" not in style
    assert "@import" not in style
    # Should a viewer try to load anything anyway, the page's own policy forbids it.
    csp = [
        v for t, n, v in page.attributes if t == "meta" and n == "content" and "src" in (v or "")
    ]
    assert csp == ["default-src 'none'; style-src 'unsafe-inline'"]


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("profile", PROFILES)
def test_html_notice_is_self_contained_and_has_every_heading(profile: str, lang: str) -> None:
    policy = load_policy(profile)
    page_text = render_notice(policy, CONTROLLER, lang, "html")
    markdown = render_notice(policy, CONTROLLER, lang, "markdown")
    page = parse(page_text)
    assert page.declarations == ["DOCTYPE html"]
    assert page.tags[:2] == ["html", "head"]
    assert ("html", "lang", lang) in page.attributes
    assert ("meta", "charset", "utf-8") in page.attributes
    assert_self_contained(page)
    # The same sections in the same order as the Markdown, which other tests read closely.
    assert page.headings == markdown_headings(markdown)
    headings = {text for _, text in page.headings}
    fixed = {
        "en": (
            "Who is responsible",
            "Passwords are never stored",
            "The data we process",
            "Where the data is processed",
            "Our servers",
            "Other recipients",
            "Your rights",
            "Right to lodge a complaint with a supervisory authority (Art. 77 GDPR)",
        ),
        "de": (
            "Verantwortlicher",
            "Passwörter werden nie gespeichert",
            "Welche Daten wir verarbeiten",
            "Wo die Daten verarbeitet werden",
            "Unsere Server",
            "Weitere Empfänger",
            "Ihre Rechte",
            "Recht auf Beschwerde bei einer Aufsichtsbehörde (Art. 77 DSGVO)",
        ),
    }[lang]
    assert set(fixed) <= headings
    assert {c.title[lang] for c in policy.categories.values()} <= headings
    assert (1, policy.title[lang]) == page.headings[0]
    assert f"<title>{policy.title[lang]}</title>" in page_text


@pytest.mark.parametrize("lang", LANGUAGES)
def test_html_notice_says_what_the_markdown_says(lang: str) -> None:
    policy = load_policy("auerproxy")
    text = "".join(parse(render_notice(policy, CONTROLLER, lang, "html")).text)
    authority = CONTROLLER.supervisory_authority
    assert authority is not None
    for phrase in (
        {"en": "deleted 12 months after last use", "de": "gelöscht 12 Monate nach der letzten"}[
            lang
        ],
        {"en": "United States, outside the EU/EEA", "de": "Vereinigte Staaten, außerhalb"}[lang],
        "EU-US Data Privacy Framework",
        authority.name,
        "Prinzenstraße 5, 30159 Hannover",
        authority.phone,
        authority.website,
    ):
        assert phrase in text


def test_emails_are_mailto_links_and_the_website_is_not_a_link() -> None:
    page = parse(render_notice(load_policy("auerproxy"), CONTROLLER, "en", "html"))
    links = [value for tag, name, value in page.attributes if (tag, name) == ("a", "href")]
    authority = CONTROLLER.supervisory_authority
    assert authority is not None
    assert links == [
        f"mailto:{CONTROLLER.email}",
        f"mailto:{CONTROLLER.dpo_email}",
        f"mailto:{CONTROLLER.email}",
        f"mailto:{authority.email}",
    ]


HOSTILE = 'Müller & <Söhne> "GmbH" <script>alert(1)</script>'


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_text_is_escaped_in_html_and_markdown(lang: str) -> None:
    controller = Controller(
        name=HOSTILE,
        address="<img src=x onerror=alert(1)>\n10115 Berlin",
        email="privacy&legal@example.com",
        dpo_name="*Erika* _Mustermann_ [link](https://example.com)",
        dpo_email="dpo@example.com",
        supervisory_authority=SupervisoryAuthority(
            name="</li></ul><a href='https://evil.example'>x</a>",
            address="Prinzenstraße 5",
            website="https://example.com/?a=1&b=<2>",
        ),
    )
    policy = load_policy("auerproxy")
    registration = replace(
        policy.categories["registration"],
        purpose={
            "en": "<iframe src='https://evil.example'></iframe>",
            "de": "<iframe src='https://evil.example'></iframe>",
        },
    )
    policy = replace(policy, categories={**policy.categories, "registration": registration})
    page = parse(render_notice(policy, controller, lang, "html"))
    assert_self_contained(page)
    text = "".join(page.text)
    for raw in (
        HOSTILE,
        "<img src=x onerror=alert(1)>, 10115 Berlin",
        "</li></ul><a href='https://evil.example'>x</a>",
        "https://example.com/?a=1&b=<2>",
        "<iframe src='https://evil.example'></iframe>",
        "privacy&legal@example.com",
    ):
        assert raw in text, raw
    assert ("a", "href", "mailto:privacy%26legal@example.com") in page.attributes
    markdown = render_notice(policy, controller, lang)
    assert r'Müller & \<Söhne\> "GmbH" \<script\>alert(1)\</script\>' in markdown
    assert r"\*Erika\* \_Mustermann\_ \[link\](https://example.com)" in markdown
    # No "<" reaches a Markdown renderer unescaped, so no text becomes inline HTML.
    assert re.search(r"(?<!\\)<", markdown) is None


def test_unknown_format_is_refused_naming_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"'pdf'.*markdown, html"):
        render_notice(load_policy("auerproxy"), CONTROLLER, "en", "pdf")


@pytest.mark.parametrize("lang", LANGUAGES)
def test_policy_render_writes_html_with_the_configured_authority(tmp_path: Path, lang: str) -> None:
    out = tmp_path / f"notice.{lang}.html"
    argv = ["policy", "render", "--lang", lang, "--format", "html", "--output", str(out)]
    assert main(argv) == 0
    page = parse(out.read_text(encoding="utf-8"))
    assert_self_contained(page)
    # The shipped sample configuration names Lower Saxony's authority.
    assert "Die Landesbeauftragte für den Datenschutz Niedersachsen" in "".join(page.text)


def test_policy_render_keeps_markdown_as_its_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "render", "--lang", "de"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Datenschutzhinweise")
    out = tmp_path / "notice.md"
    assert main(["policy", "render", "--lang", "de", "--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == printed


def test_policy_render_refuses_an_unknown_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["policy", "render", "--format", "pdf"])
    assert caught.value.code == 2
    assert "invalid choice: 'pdf'" in capsys.readouterr().err
