"""The ``documents`` table: one row per knowledge-base document.

``generation`` names the indexed version whose chunks are served (its original lives in
``documents_dir/<account>/<id>/<generation>/``); ``pending_generation`` names a version being
indexed. A replacement is built beside the served one and swapped in by one conditional UPDATE, so
search never sees a half-indexed document.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .db import Base, UtcDateTime, new_id, utcnow

DocumentStatus = Literal["processing", "ready", "failed"]


class Document(Base):
    __tablename__ = "documents"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    account_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(255))
    # The served file's original name, sniffed type and size (the pending file's until the first
    # version is indexed).
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="processing")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    generation: Mapped[str | None] = mapped_column(String(36), default=None)
    pending_generation: Mapped[str | None] = mapped_column(String(36), default=None)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)
