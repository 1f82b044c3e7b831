"""Real small documents made with maintained libraries (fpdf2, python-docx), for the tests."""

from __future__ import annotations

import io
from collections.abc import Sequence

import docx
from fpdf import FPDF
from PIL import Image


def make_pdf(pages: Sequence[str]) -> bytes:
    """A PDF with one text page per item (text wraps; several pages of real text)."""
    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    for text in pages:
        pdf.add_page()
        for paragraph in text.split("\n\n"):
            pdf.multi_cell(0, 6, paragraph)
            pdf.ln(4)
    return bytes(pdf.output())


def make_image_only_pdf() -> bytes:
    """A 'scanned' PDF: one page holding a picture and no text at all."""
    pdf = FPDF()
    pdf.add_page()
    pdf.image(Image.new("RGB", (320, 200), (40, 90, 160)), x=10, y=10, w=120)
    return bytes(pdf.output())


def make_blank_pdf() -> bytes:
    pdf = FPDF()
    pdf.add_page()
    pdf.rect(20, 20, 50, 30)  # vector drawing, no text
    return bytes(pdf.output())


def make_docx(paragraphs: Sequence[str], table: Sequence[Sequence[str]] = ()) -> bytes:
    document = docx.Document()
    document.add_heading("Company handbook", level=1)
    for text in paragraphs:
        document.add_paragraph(text)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, value in enumerate(row):
                grid.cell(r, c).text = value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


BROKEN_PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n" + b"\x8f\x01garbage" * 40
