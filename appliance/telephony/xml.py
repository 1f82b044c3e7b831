"""Plivo XML replies to the answer URL (PLIVO.md §1), built with the plivo SDK's XML elements."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from plivo import plivoxml

from appliance.telephony.protocol import format_extra_headers, parse_extra_headers

STREAM_CONTENT_TYPE = "audio/x-mulaw;rate=8000"
MAX_EXTRA_HEADERS_BYTES = 512
MAX_STREAM_URL_CHARS = 2048
MAX_XML_BYTES = 100 * 1024
_ALNUM = re.compile(r"^[A-Za-z0-9]+$")
DEFAULT_APOLOGY = "Sorry, this agent is not available right now. Please try again later. Goodbye."


def websocket_url(base_url: str, path: str, query: str = "") -> str:
    """The public websocket URL for ``path`` under the public base URL (http -> ws, https -> wss)."""
    parts = urlsplit(base_url.rstrip("/"))
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    full_path = parts.path + "/" + path.lstrip("/")
    return urlunsplit((scheme, parts.netloc, full_path, query, ""))


def check_extra_headers(headers: Mapping[str, str]) -> str:
    """Serialise extraHeaders, enforcing Plivo's limits: letters and digits only, at most 512 bytes."""
    for key, value in headers.items():
        if not _ALNUM.match(key) or not _ALNUM.match(value):
            raise ValueError(f"extraHeaders {key!r}: keys and values must be letters and digits only")
    text = format_extra_headers(headers)
    if len(text.encode()) > MAX_EXTRA_HEADERS_BYTES:
        raise ValueError(
            f"extraHeaders is {len(text.encode())} bytes, Plivo allows {MAX_EXTRA_HEADERS_BYTES}"
        )
    return text


def stream_xml(
    ws_url: str,
    *,
    extra_headers: Mapping[str, str] | None = None,
    status_callback_url: str | None = None,
    status_callback_method: str = "POST",
    stream_timeout_s: int | None = None,
) -> str:
    """``<Response><Stream ...>wss://...</Stream></Response>`` for a bidirectional µ-law agent stream."""
    if not ws_url.startswith(("ws://", "wss://")):
        raise ValueError(f"stream URL must be ws:// or wss://, got {ws_url[:40]!r}")
    if len(ws_url) > MAX_STREAM_URL_CHARS:
        raise ValueError(f"stream URL is {len(ws_url)} characters, Plivo allows {MAX_STREAM_URL_CHARS}")
    element = plivoxml.StreamElement(
        ws_url,
        bidirectional=True,
        audioTrack="inbound",  # bidirectional streams must take the inbound track only
        keepCallAlive=True,
        contentType=STREAM_CONTENT_TYPE,
        streamTimeout=stream_timeout_s,
        statusCallbackUrl=status_callback_url,
        statusCallbackMethod=status_callback_method if status_callback_url else None,
        extraHeaders=check_extra_headers(extra_headers) if extra_headers else None,
    )
    xml = plivoxml.ResponseElement().add(element).to_string(pretty=False)
    return _checked(xml)


def apology_xml(text: str = DEFAULT_APOLOGY) -> str:
    """Speak an apology, then hang up: the reply for unknown agents or when over capacity."""
    response = plivoxml.ResponseElement()
    response.add(plivoxml.SpeakElement(text))
    response.add(plivoxml.HangupElement())
    return _checked(response.to_string(pretty=False))


def _checked(xml: str) -> str:
    if len(xml.encode()) > MAX_XML_BYTES:
        raise ValueError("Plivo XML replies are limited to 100 KB")
    return xml


@dataclass(frozen=True)
class StreamInstruction:
    """A parsed ``<Stream>`` element (what Plivo would act on)."""

    url: str
    attributes: dict[str, str]
    extra_headers: dict[str, str] = field(default_factory=dict)


def parse_stream_xml(xml: str | bytes) -> StreamInstruction:
    """Find the single ``<Stream>`` in an answer-URL reply, as Plivo reads it. ValueError if absent."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"answer reply is not XML: {exc}") from exc
    if root.tag != "Response":
        raise ValueError(f"answer reply root is <{root.tag}>, not <Response>")
    streams = root.findall("Stream")
    if len(streams) != 1:
        raise ValueError(f"answer reply has {len(streams)} <Stream> elements, expected one")
    stream = streams[0]
    url = (stream.text or "").strip()
    if not url:
        raise ValueError("<Stream> has no websocket URL")
    attributes = dict(stream.attrib)
    return StreamInstruction(url, attributes, parse_extra_headers(attributes.get("extraHeaders", "")))
