"""The Plivo audio-stream websocket protocol as a pure codec (PLIVO.md §2).

JSON text frames in, typed events out; typed commands in, JSON text frames out. No sockets, no
clocks, no audio processing beyond base64: payloads stay µ-law (or L16) bytes. Both directions are
here because the Plivo-protocol caller (``appliance.simulator``) speaks Plivo's side with the same
shapes and validates what the server sends with :func:`parse_command`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

MULAW_RATE = 8000
FRAME_MS = 20
MULAW_FRAME_BYTES = MULAW_RATE * FRAME_MS // 1000  # 160
MAX_PLAY_PAYLOAD_B64 = 16 * 1024  # PLIVO.md: keep each playAudio payload <= 16 KB of base64
# The largest whole number of 20 ms µ-law frames whose base64 fits the limit (76 frames, 1.52 s).
MAX_PLAY_FRAMES = (MAX_PLAY_PAYLOAD_B64 // 4 * 3) // MULAW_FRAME_BYTES
MAX_MESSAGE_BYTES = 64 * 1024  # PLIVO.md: a websocket message is at most 64 KB
# An inbound media frame is ~20 ms; anything beyond one second of audio is not a frame but a bug.
MAX_MEDIA_SECONDS = 1.0
DTMF_DIGITS = re.compile(r"^[0-9*#A-Da-d]{1,64}$")
_ENCODINGS = {"audio/x-mulaw": 1, "audio/x-l16": 2}  # bytes per sample
_SUPPORTED_FORMATS = {("audio/x-mulaw", 8000), ("audio/x-l16", 8000), ("audio/x-l16", 16000)}


class ErrorKind(enum.StrEnum):
    BAD_JSON = "bad_json"
    BAD_BASE64 = "bad_base64"
    UNKNOWN_EVENT = "unknown_event"
    BAD_SIZE = "bad_size"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"
    MEDIA_BEFORE_START = "media_before_start"


class ProtocolError(ValueError):
    """A frame that breaks the protocol. ``kind`` is machine-readable, the message says why."""

    def __init__(self, kind: ErrorKind, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


# ---------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class MediaFormat:
    encoding: str
    sample_rate: int

    @property
    def bytes_per_sample(self) -> int:
        return _ENCODINGS[self.encoding]


@dataclass(frozen=True, slots=True)
class Start:
    sequence_number: int
    call_id: str
    stream_id: str
    account_id: str
    tracks: tuple[str, ...]
    media_format: MediaFormat
    extra_headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Media:
    sequence_number: int
    stream_id: str
    track: str
    timestamp_ms: int
    chunk: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Dtmf:
    sequence_number: int
    stream_id: str
    digit: str
    track: str
    timestamp_ms: int | None


@dataclass(frozen=True, slots=True)
class PlayedStream:
    """Checkpoint acknowledgement; ``played`` is the older name of the same event."""

    sequence_number: int
    stream_id: str
    name: str


@dataclass(frozen=True, slots=True)
class ClearedAudio:
    sequence_number: int
    stream_id: str


@dataclass(frozen=True, slots=True)
class Stop:
    sequence_number: int
    stream_id: str


@dataclass(frozen=True, slots=True)
class PlayFailed:
    sequence_number: int
    stream_id: str
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class StreamError:
    """Plivo's ``error`` event (shape undocumented: we keep whatever reason it carries)."""

    sequence_number: int
    stream_id: str
    reason: str


Event = Start | Media | Dtmf | PlayedStream | ClearedAudio | Stop | PlayFailed | StreamError


# ------------------------------------------------------------------------------ field helpers


def _loads(text: str | bytes) -> dict[str, Any]:
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(ErrorKind.BAD_JSON, f"frame is not UTF-8: {exc}") from exc
    if len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolError(ErrorKind.BAD_SIZE, f"frame of {len(text)} characters exceeds 64 KB")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(ErrorKind.BAD_JSON, f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(ErrorKind.BAD_JSON, f"frame is a JSON {type(data).__name__}, not an object")
    return data


def _get(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj or obj[key] is None:
        raise ProtocolError(ErrorKind.MISSING_FIELD, f"{where}: missing '{key}'")
    return obj[key]


def _obj(obj: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = _get(obj, key, where)
    if not isinstance(value, dict):
        raise ProtocolError(ErrorKind.BAD_FIELD, f"{where}: '{key}' must be an object")
    return value


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = _get(obj, key, where)
    if not isinstance(value, str) or not value:
        raise ProtocolError(ErrorKind.BAD_FIELD, f"{where}: '{key}' must be a non-empty string")
    return value


def _int(obj: Mapping[str, Any], key: str, where: str) -> int:
    """Integers that peers send either as JSON numbers or as digit strings (``timestamp``)."""
    value = _get(obj, key, where)
    if isinstance(value, bool):
        raise ProtocolError(ErrorKind.BAD_FIELD, f"{where}: '{key}' must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ProtocolError(ErrorKind.BAD_FIELD, f"{where}: '{key}' must be an integer, got {value!r}")


def _opt_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError(ErrorKind.BAD_BASE64, f"{where}: payload must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(ErrorKind.BAD_BASE64, f"{where}: payload is not base64: {exc}") from exc


def parse_extra_headers(raw: Any) -> dict[str, str]:
    """``a=1,b=2`` or ``a=1;b=2`` (PLIVO.md shows both separators). Items without ``=`` are dropped."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    if not isinstance(raw, str):
        return {}
    headers: dict[str, str] = {}
    for item in re.split(r"[,;]", raw):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            headers[key.strip()] = value.strip()
    return headers


# --------------------------------------------------------------------------- Plivo -> server


class StreamDecoder:
    """Parses one stream's incoming frames, remembering the ``start`` so media can be checked.

    One instance per websocket. A bad frame raises :class:`ProtocolError` and leaves the decoder
    usable for the next frame.
    """

    def __init__(self) -> None:
        self.start: Start | None = None

    def feed(self, text: str | bytes) -> Event:
        event = parse_event(text, self.start)
        if isinstance(event, Start):
            self.start = event
        return event


def parse_event(text: str | bytes, start: Start | None = None) -> Event:
    """One frame from Plivo -> event. ``start`` is the stream's start event (None before it)."""
    data = _loads(text)
    name = _get(data, "event", "frame")
    if not isinstance(name, str):
        raise ProtocolError(ErrorKind.BAD_FIELD, "'event' must be a string")
    seq = _int(data, "sequenceNumber", name) if "sequenceNumber" in data else 0
    if name == "start":
        return _parse_start(data, seq)
    stream_id = _opt_str(data, "streamId") or (start.stream_id if start else "")
    if name == "media":
        if start is None:
            raise ProtocolError(ErrorKind.MEDIA_BEFORE_START, "media frame before the start event")
        return _parse_media(data, seq, stream_id, start.media_format)
    if name == "dtmf":
        dtmf = _obj(data, "dtmf", name)
        digit = _str(dtmf, "digit", "dtmf")
        ts = _int(dtmf, "timestamp", "dtmf") if dtmf.get("timestamp") not in (None, "") else None
        return Dtmf(seq, stream_id, digit, _opt_str(dtmf, "track") or "inbound", ts)
    if name in ("playedStream", "played"):
        return PlayedStream(seq, stream_id, _str(data, "name", name))
    if name == "clearedAudio":
        return ClearedAudio(seq, stream_id)
    if name == "stop":
        return Stop(seq, stream_id)
    if name == "playFailed":
        return PlayFailed(seq, stream_id, _opt_str(data, "name"), _describe(data))
    if name == "error":
        return StreamError(seq, stream_id, _describe(data))
    raise ProtocolError(ErrorKind.UNKNOWN_EVENT, f"unknown event '{name[:40]}'")


def _describe(data: Mapping[str, Any]) -> str:
    for key in ("reason", "message", "error", "description"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value[:500]
        if isinstance(value, dict):
            return json.dumps(value)[:500]
    return ""


def _parse_start(data: Mapping[str, Any], seq: int) -> Start:
    start = _obj(data, "start", "start")
    fmt = _obj(start, "mediaFormat", "start")
    encoding = _str(fmt, "encoding", "start.mediaFormat")
    rate = _int(fmt, "sampleRate", "start.mediaFormat")
    if (encoding, rate) not in _SUPPORTED_FORMATS:
        raise ProtocolError(ErrorKind.BAD_FIELD, f"start: unsupported media format {encoding} at {rate} Hz")
    tracks = start.get("tracks", ["inbound"])
    if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
        raise ProtocolError(ErrorKind.BAD_FIELD, "start: 'tracks' must be a list of strings")
    return Start(
        sequence_number=seq,
        call_id=_str(start, "callId", "start"),
        # PLIVO.md puts streamId inside "start"; accept it at the top level too, as on other events.
        stream_id=_str(start if start.get("streamId") else data, "streamId", "start"),
        account_id=_opt_str(start, "accountId"),
        tracks=tuple(tracks),
        media_format=MediaFormat(encoding, rate),
        extra_headers=parse_extra_headers(data.get("extra_headers", start.get("extra_headers"))),
    )


def _parse_media(data: Mapping[str, Any], seq: int, stream_id: str, fmt: MediaFormat) -> Media:
    media = _obj(data, "media", "media")
    payload = _b64(_get(media, "payload", "media"), "media")
    if not payload:
        raise ProtocolError(ErrorKind.BAD_SIZE, "media: empty payload")
    width = fmt.bytes_per_sample
    if len(payload) % width:
        raise ProtocolError(
            ErrorKind.BAD_SIZE, f"media: {len(payload)} bytes is not a whole number of {width}-byte samples"
        )
    limit = int(fmt.sample_rate * width * MAX_MEDIA_SECONDS)
    if len(payload) > limit:
        raise ProtocolError(ErrorKind.BAD_SIZE, f"media: {len(payload)} bytes is more than one second")
    return Media(
        sequence_number=seq,
        stream_id=stream_id,
        track=_opt_str(media, "track") or "inbound",
        timestamp_ms=_int(media, "timestamp", "media"),
        chunk=_int(media, "chunk", "media") if "chunk" in media else 0,
        payload=payload,
    )


# --------------------------------------------------------------------------- server -> Plivo


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def encode_play_audio(mulaw: bytes) -> str:
    """One ``playAudio`` frame: whole 20 ms µ-law frames, base64 at most 16 KB."""
    if not mulaw or len(mulaw) % MULAW_FRAME_BYTES:
        raise ValueError(
            f"playAudio needs a positive multiple of {MULAW_FRAME_BYTES} bytes, got {len(mulaw)}"
        )
    if len(mulaw) > MAX_PLAY_FRAMES * MULAW_FRAME_BYTES:
        raise ValueError(f"playAudio payload of {len(mulaw)} bytes exceeds 16 KB of base64")
    payload = base64.b64encode(mulaw).decode("ascii")
    return _dumps(
        {
            "event": "playAudio",
            "media": {"contentType": "audio/x-mulaw", "sampleRate": MULAW_RATE, "payload": payload},
        }
    )


def iter_play_audio(mulaw: bytes, frames_per_message: int = MAX_PLAY_FRAMES) -> Iterator[str]:
    """Split whole-frame µ-law audio into as many ``playAudio`` frames as the size limit needs."""
    if not 1 <= frames_per_message <= MAX_PLAY_FRAMES:
        raise ValueError(f"frames_per_message must be 1..{MAX_PLAY_FRAMES}")
    step = frames_per_message * MULAW_FRAME_BYTES
    if len(mulaw) % MULAW_FRAME_BYTES:
        raise ValueError(f"audio of {len(mulaw)} bytes is not whole 20 ms frames")
    for offset in range(0, len(mulaw), step):
        yield encode_play_audio(mulaw[offset : offset + step])


def encode_checkpoint(stream_id: str, name: str) -> str:
    if not stream_id or not name:
        raise ValueError("checkpoint needs a stream id and a name")
    return _dumps({"event": "checkpoint", "streamId": stream_id, "name": name})


def encode_clear_audio(stream_id: str) -> str:
    if not stream_id:
        raise ValueError("clearAudio needs a stream id")
    return _dumps({"event": "clearAudio", "streamId": stream_id})


def encode_send_dtmf(digits: str) -> str:
    if not DTMF_DIGITS.match(digits):
        raise ValueError(f"invalid DTMF digits {digits!r}")
    return _dumps({"event": "sendDTMF", "dtmf": digits})


@dataclass(frozen=True, slots=True)
class PlayAudio:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Checkpoint:
    stream_id: str
    name: str


@dataclass(frozen=True, slots=True)
class ClearAudio:
    stream_id: str


@dataclass(frozen=True, slots=True)
class SendDtmf:
    digits: str


Command = PlayAudio | Checkpoint | ClearAudio | SendDtmf

_COMMAND_KEYS: dict[str, set[str]] = {
    "playAudio": {"event", "media"},
    "checkpoint": {"event", "streamId", "name"},
    "clearAudio": {"event", "streamId"},
    "sendDTMF": {"event", "dtmf"},
}


def parse_command(text: str | bytes, stream_id: str | None = None) -> Command:
    """Strictly validate one server -> Plivo frame against PLIVO.md's shapes (µ-law 8 kHz stream).

    ``stream_id``, when given, must match the ``streamId`` of checkpoint/clearAudio.
    """
    data = _loads(text)
    name = _get(data, "event", "frame")
    if name not in _COMMAND_KEYS:
        raise ProtocolError(ErrorKind.UNKNOWN_EVENT, f"unknown command '{str(name)[:40]}'")
    extra = set(data) - _COMMAND_KEYS[name]
    if extra:
        raise ProtocolError(ErrorKind.BAD_FIELD, f"{name}: unexpected keys {sorted(extra)}")
    if name == "playAudio":
        media = _obj(data, "media", name)
        if set(media) != {"contentType", "sampleRate", "payload"}:
            raise ProtocolError(ErrorKind.BAD_FIELD, f"playAudio.media keys are {sorted(media)}")
        if media["contentType"] != "audio/x-mulaw":
            raise ProtocolError(ErrorKind.BAD_FIELD, f"playAudio contentType {media['contentType']!r}")
        if media["sampleRate"] != MULAW_RATE or isinstance(media["sampleRate"], bool):
            raise ProtocolError(ErrorKind.BAD_FIELD, f"playAudio sampleRate {media['sampleRate']!r}")
        raw = media["payload"]
        if isinstance(raw, str) and len(raw) > MAX_PLAY_PAYLOAD_B64:
            raise ProtocolError(ErrorKind.BAD_SIZE, f"playAudio payload is {len(raw)} base64 chars > 16 KB")
        payload = _b64(raw, name)
        if not payload or len(payload) % MULAW_FRAME_BYTES:
            raise ProtocolError(
                ErrorKind.BAD_SIZE, f"playAudio payload of {len(payload)} bytes is not whole 20 ms frames"
            )
        return PlayAudio(payload)
    if name == "sendDTMF":
        digits = _get(data, "dtmf", name)
        if not isinstance(digits, str) or not DTMF_DIGITS.match(digits):
            raise ProtocolError(ErrorKind.BAD_FIELD, f"sendDTMF digits {digits!r}")
        return SendDtmf(digits)
    sid = _str(data, "streamId", name)
    if stream_id is not None and sid != stream_id:
        raise ProtocolError(ErrorKind.BAD_FIELD, f"{name}: streamId {sid!r} is not this stream's")
    if name == "checkpoint":
        return Checkpoint(sid, _str(data, "name", name))
    return ClearAudio(sid)


# ------------------------------------------------- Plivo-side encoders (simulator, tests)


def format_extra_headers(headers: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in headers.items())


def encode_start(
    *,
    sequence_number: int,
    call_id: str,
    stream_id: str,
    account_id: str,
    extra_headers: str = "",
    encoding: str = "audio/x-mulaw",
    sample_rate: int = MULAW_RATE,
) -> str:
    return _dumps(
        {
            "event": "start",
            "sequenceNumber": sequence_number,
            "start": {
                "callId": call_id,
                "streamId": stream_id,
                "accountId": account_id,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": encoding, "sampleRate": sample_rate},
            },
            "extra_headers": extra_headers,
        }
    )


def encode_media(
    *,
    sequence_number: int,
    stream_id: str,
    chunk: int,
    timestamp_ms: int,
    payload: bytes,
    extra_headers: str = "",
) -> str:
    return _dumps(
        {
            "event": "media",
            "sequenceNumber": sequence_number,
            "streamId": stream_id,
            "media": {
                "track": "inbound",
                "timestamp": str(timestamp_ms),
                "chunk": chunk,
                "payload": base64.b64encode(payload).decode("ascii"),
            },
            "extra_headers": extra_headers,
        }
    )


def encode_dtmf(*, sequence_number: int, stream_id: str, digit: str, timestamp_ms: int) -> str:
    return _dumps(
        {
            "event": "dtmf",
            "sequenceNumber": sequence_number,
            "streamId": stream_id,
            "dtmf": {"track": "inbound", "digit": digit, "timestamp": str(timestamp_ms)},
        }
    )


def encode_played_stream(*, sequence_number: int, stream_id: str, name: str) -> str:
    return _dumps(
        {"event": "playedStream", "sequenceNumber": sequence_number, "streamId": stream_id, "name": name}
    )


def encode_cleared_audio(*, sequence_number: int, stream_id: str) -> str:
    return _dumps({"event": "clearedAudio", "sequenceNumber": sequence_number, "streamId": stream_id})


def encode_stop(*, sequence_number: int, stream_id: str) -> str:
    return _dumps({"event": "stop", "sequenceNumber": sequence_number, "streamId": stream_id})
