"""Plivo-style list pages: ``?limit=`` (default 20, at most 100) and ``?offset=``, answered as
``{"meta": {"limit", "offset", "total_count", "next", "previous"}, "objects": [...]}``.

``next``/``previous`` are the same path with the neighbouring offset (``None`` at either end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Generic, TypeVar
from urllib.parse import urlencode

from fastapi import Depends, Query, Request
from pydantic import BaseModel, Field

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

T = TypeVar("T")


class PageMeta(BaseModel):
    limit: int
    offset: int
    total_count: int
    next: str | None = Field(description="Path and query of the next page, or null on the last")
    previous: str | None = Field(description="Path and query of the previous page, or null on the first")


class Page(BaseModel, Generic[T]):
    meta: PageMeta
    objects: list[T]


@dataclass(frozen=True)
class PageParams:
    limit: int
    offset: int


def page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Objects per page (1-100)")] = DEFAULT_LIMIT,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1, description="Objects to skip")] = 0,
) -> PageParams:
    return PageParams(limit=limit, offset=offset)


PageDep = Annotated[PageParams, Depends(page_params)]


def _link(request: Request, limit: int, offset: int) -> str:
    query = dict(request.query_params)
    query.update(limit=str(limit), offset=str(offset))
    return f"{request.url.path}?{urlencode(query)}"


def make_page(request: Request, params: PageParams, total: int, objects: list[T]) -> Page[T]:
    """Wrap one page of ``objects`` (already limited and offset) with its ``meta``."""
    nxt = None
    if params.offset + params.limit < total:
        nxt = _link(request, params.limit, params.offset + params.limit)
    prev = None
    if params.offset > 0:
        prev = _link(request, params.limit, max(0, params.offset - params.limit))
    meta = PageMeta(limit=params.limit, offset=params.offset, total_count=total, next=nxt, previous=prev)
    return Page[T](meta=meta, objects=objects)
