from __future__ import annotations

import json

import pytest

from appliance.knowledge.extract import (
    UnreadableDocument,
    UnsupportedType,
    extract,
    markdown_to_text,
    sniff,
)

from .docs import BROKEN_PDF, make_blank_pdf, make_docx, make_image_only_pdf, make_pdf


def test_pdf_is_sniffed_from_content_and_keeps_pages() -> None:
    data = make_pdf(["Alpha page talks about apples.", "Beta page talks about bananas.", "Gamma page."])
    # The name lies; the content decides.
    assert sniff(data, "notes.txt") == "pdf"
    sections = extract(data, "pdf")
    assert [s.page for s in sections] == [1, 2, 3]
    assert "apples" in sections[0].text and "bananas" in sections[1].text


def test_pdf_line_wrapping_is_undone() -> None:
    sentence = (
        "The night ferry to the northern islands leaves from pier seven at twenty to midnight, "
        "and tickets can be bought on board with a card or in cash from the purser."
    )
    (section,) = extract(make_pdf(["Ferries\n\n" + sentence]), "pdf")
    # fpdf2 wraps the sentence over several lines; extraction gives it back whole, heading apart.
    assert section.text == "Ferries\n" + sentence


def test_docx_paragraphs_and_tables_in_document_order() -> None:
    data = make_docx(
        ["The office opens at eight.", "Parking is free on Sundays."],
        table=[["Plan", "Price"], ["Basic", "12 EUR"], ["Premium", "30 EUR"]],
    )
    assert sniff(data, "handbook.bin") == "docx"
    (section,) = extract(data, "docx")
    assert section.page is None
    text = section.text
    assert text.index("Company handbook") < text.index("opens at eight") < text.index("Premium | 30 EUR")
    assert "Basic | 12 EUR" in text


def test_markdown_by_extension_and_by_content() -> None:
    source = "# Returns\n\nItems can be returned **within 30 days** of [delivery](https://x.example).\n"
    assert sniff(source.encode(), "returns.md") == "markdown"
    assert sniff(source.encode(), "returns") == "markdown"  # headings + link syntax
    (section,) = extract(source.encode(), "markdown")
    assert section.text == "Returns\nItems can be returned within 30 days of delivery."


def test_markdown_lists_tables_and_code_become_lines() -> None:
    source = (
        "## Plans\n\n- Basic\n- Premium\n\n| Plan | Price |\n|---|---|\n| Basic | 12 |\n\n"
        "```\nrun --fast\n```\n"
    )
    text = markdown_to_text(source)
    assert "Plans\nBasic\nPremium" in text
    assert "Plan | Price\nBasic | 12" in text
    assert "run --fast" in text
    assert "|---|" not in text and "```" not in text


def test_plain_text_and_json_text() -> None:
    assert sniff(b"Just a plain sentence about nothing.", "a.txt") == "text"
    payload = json.dumps({"faq": [{"q": "Do you ship to Chile?", "a": "Yes, within 5 days."}]}).encode()
    assert sniff(payload, "faq.json") == "json"
    (section,) = extract(payload, "json")
    assert "ship to Chile" in section.text


def test_utf8_with_bom_and_crlf_is_normalised() -> None:
    data = "\ufeffLine one.\r\nLine two.\r\n\r\n\r\n\r\nLast.".encode()
    assert extract(data, sniff(data, "x.txt"))[0].text == "Line one.\nLine two.\n\nLast."


@pytest.mark.parametrize("data", [b"", b"   \n\t  "])
def test_empty_file_is_refused(data: bytes) -> None:
    with pytest.raises(UnreadableDocument, match="empty"):
        sniff(data, "empty.txt")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        ("caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8"),
        (b"PK\x03\x04" + b"\x00" * 40, "zip"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 40, ".doc"),
    ],
)
def test_wrong_types_are_refused_with_a_reason(data: bytes, words: str) -> None:
    with pytest.raises(UnsupportedType, match=words):
        sniff(data, "upload.txt")


def test_broken_pdf_is_unreadable() -> None:
    assert sniff(BROKEN_PDF) == "pdf"
    with pytest.raises(UnreadableDocument, match="damaged"):
        extract(BROKEN_PDF, "pdf")


def test_truncated_pdf_is_unreadable() -> None:
    data = make_pdf(["Some text on a page that will be cut off."])
    with pytest.raises(UnreadableDocument):
        extract(data[: len(data) // 2], "pdf")


@pytest.mark.parametrize("maker", [make_image_only_pdf, make_blank_pdf])
def test_pdf_without_text_is_unreadable(maker: object) -> None:
    data = maker()  # type: ignore[operator]
    with pytest.raises(UnreadableDocument, match="no extractable text"):
        extract(data, sniff(data))


def test_damaged_docx_is_unreadable() -> None:
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("word/document.xml", "<not really xml")
    data = out.getvalue()
    assert sniff(data) == "docx"
    with pytest.raises(UnreadableDocument, match="Word document"):
        extract(data, "docx")
