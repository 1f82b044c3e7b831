"""Sniff a document's type from its bytes and extract its text, page by page where pages exist.

The type comes from the content (PDF magic, a zip holding ``word/document.xml``, strict UTF-8); the
file name only tells Markdown from plain text. Every failure is a sentence a user can act on.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from markdown_it.token import Token

Kind = Literal["pdf", "docx", "markdown", "json", "text"]

CONTENT_TYPES: dict[Kind, str] = {
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "markdown": "text/markdown",
    "json": "application/json",
    "text": "text/plain",
}
MARKDOWN_SUFFIXES = (".md", ".markdown", ".mdown", ".mkd")
# A PDF header may follow a little junk; readers accept it within the first KiB.
_PDF_HEADER_WINDOW = 1024
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_MARKDOWN_LINE = re.compile(r"^(#{1,6} \S|```|~~~|\s*[-*+] \S|\s*\d+\. \S|> |\|.*\|\s*$)|\[[^\]]+\]\([^)]+\)")


class DocumentError(Exception):
    """The document cannot be indexed; the message says why in words a user understands."""


class UnsupportedType(DocumentError):
    """Not a PDF, DOCX, Markdown or UTF-8 text file (HTTP 415)."""


class UnreadableDocument(DocumentError):
    """The type is right but the content is empty, broken or has no text (HTTP 422 / failed)."""


@dataclass(frozen=True)
class Section:
    """A run of text; ``page`` is 1-based for PDFs and ``None`` for formats without pages."""

    text: str
    page: int | None = None


def sniff(data: bytes, filename: str = "") -> Kind:
    """Decide the kind from the bytes. Raises ``UnreadableDocument`` for an empty file and
    ``UnsupportedType`` for anything that is not PDF, DOCX or UTF-8 text."""
    if not data or data.isspace():
        raise UnreadableDocument("the file is empty")
    if b"%PDF-" in data[:_PDF_HEADER_WINDOW]:
        return "pdf"
    if data.startswith(b"PK\x03\x04"):
        if _is_docx(data):
            return "docx"
        raise UnsupportedType("the file is a zip archive but not a Word (.docx) document")
    if data.startswith(_OLE_MAGIC):
        raise UnsupportedType("legacy Office files (.doc) are not supported; save the file as .docx or PDF")
    text = _decode(data)
    if filename.lower().endswith(MARKDOWN_SUFFIXES) or _looks_like_markdown(text):
        return "markdown"
    if filename.lower().endswith(".json") or text.lstrip()[:1] in ("{", "["):
        try:
            json.loads(text)
        except ValueError:
            return "text"
        return "json"
    return "text"


def extract(data: bytes, kind: Kind) -> list[Section]:
    """Text of the document as sections (one per PDF page). Raises ``UnreadableDocument`` when the
    file is broken or holds no text."""
    if kind == "pdf":
        sections = _pdf_sections(data)
    elif kind == "docx":
        sections = [Section(_docx_text(data))]
    elif kind == "markdown":
        sections = [Section(markdown_to_text(_decode(data)))]
    else:
        sections = [Section(_decode(data))]
    sections = [Section(_normalise(s.text), s.page) for s in sections]
    sections = [s for s in sections if s.text]
    if not sections:
        if kind == "pdf":
            raise UnreadableDocument(
                "the PDF has no extractable text (scanned or image-only pages are not supported)"
            )
        raise UnreadableDocument("the document contains no text")
    return sections


def _decode(data: bytes) -> str:
    if b"\x00" in data:
        raise UnsupportedType("the file is binary; upload a PDF, DOCX, Markdown or UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnsupportedType(
            f"the file is not UTF-8 text (invalid byte at offset {exc.start}); "
            "upload a PDF, DOCX, Markdown or UTF-8 text file"
        ) from exc


def _is_docx(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return "word/document.xml" in archive.namelist()
    except zipfile.BadZipFile:
        return False


def _looks_like_markdown(text: str) -> bool:
    lines = text.splitlines()[:200]
    return sum(1 for line in lines if _MARKDOWN_LINE.search(line)) >= 2


def _normalise(text: str) -> str:
    """Unify line ends, drop control characters, collapse runs of spaces and of blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00ad", "")
    text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", " ", text)
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# -- PDF -----------------------------------------------------------------------------------------


def _pdf_sections(data: bytes) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableDocument("the PDF is password-protected")
        sections = []
        for number, page in enumerate(reader.pages, start=1):
            sections.append(Section(_reflow(page.extract_text() or ""), number))
    except FileNotDecryptedError as exc:
        raise UnreadableDocument("the PDF is password-protected") from exc
    # pypdf reports damage with its own errors but also with whatever the damaged structure trips
    # over (KeyError, ValueError, ...); every one of them means "this PDF cannot be read".
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as exc:
        raise UnreadableDocument(f"the PDF is damaged or not a valid PDF ({type(exc).__name__})") from exc
    return sections


def _reflow(text: str) -> str:
    """Undo the PDF's visual line wrapping: a line that continues a sentence (the next line starts
    in lower case, or this one ends with a comma or a hyphen) is joined to it, so sentences are whole
    again for chunking. Headings and lines that end a sentence keep their break."""
    text = re.sub(r"(\w-)\n(?=[a-z])", r"\1", text)  # a hyphenated word split across lines
    return re.sub(r"(?<=[^\n])\n(?=[a-z(])|(?<=[,;])\n(?=\S)", " ", text)


# -- DOCX ----------------------------------------------------------------------------------------


def _docx_text(data: bytes) -> str:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(io.BytesIO(data))
        blocks: list[str] = []
        for item in document.iter_inner_content():
            blocks.extend(_docx_block(item))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise UnreadableDocument(f"the Word document is damaged ({type(exc).__name__})") from exc
    return "\n\n".join(b for b in blocks if b.strip())


def _docx_block(item: object) -> list[str]:
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    if isinstance(item, Paragraph):
        return [item.text]
    if isinstance(item, Table):
        # One line per row, cells joined, so a row's facts stay together in one chunk. Merged
        # cells repeat the same cell object across the row; keep them once.
        rows = []
        for row in item.rows:
            cells: list[str] = []
            seen: set[int] = set()
            for cell in row.cells:
                if id(cell._tc) in seen:
                    continue
                seen.add(id(cell._tc))
                text = " ".join(" ".join(_docx_block(inner)) for inner in cell.iter_inner_content()).strip()
                if text:
                    cells.append(text)
            if cells:
                rows.append(" | ".join(cells))
        return ["\n".join(rows)]
    return []


# -- Markdown ------------------------------------------------------------------------------------


def markdown_to_text(source: str) -> str:
    """Markdown rendered to plain text: markup dropped, headings kept on their own line right above
    the paragraph they introduce, list items and table rows one per line, code kept verbatim."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark").enable("table")
    out: list[str] = []
    row: list[str] | None = None
    for token in md.parse(source):
        kind = token.type
        if kind == "inline":
            text = _inline_text(token.children or [])
            if row is not None:
                row.append(text.strip())
            else:
                out.append(text)
        elif kind in ("fence", "code_block"):
            out.append(token.content.rstrip("\n") + "\n\n")
        elif kind == "heading_close":
            out.append("\n")
        elif kind == "paragraph_close":
            # Tight list items have hidden paragraphs: one line each, not one paragraph each.
            out.append("\n" if token.hidden else "\n\n")
        elif kind in ("bullet_list_close", "ordered_list_close") and token.level == 0:
            out.append("\n")
        elif kind == "tr_open":
            row = []
        elif kind == "tr_close" and row is not None:
            out.append(" | ".join(c for c in row if c) + "\n")
            row = None
        elif kind == "table_close":
            out.append("\n")
    return "".join(out)


def _inline_text(children: Sequence[Token]) -> str:
    parts: list[str] = []
    for child in children:
        kind = child.type
        if kind in ("text", "code_inline"):
            parts.append(child.content)
        elif kind == "softbreak":
            parts.append(" ")
        elif kind == "hardbreak":
            parts.append("\n")
        elif kind == "image":
            parts.append(child.content)  # the alt text
    return "".join(parts)
