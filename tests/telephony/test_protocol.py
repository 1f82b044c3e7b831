import base64
import json

import pytest

from appliance.telephony import protocol as p
from appliance.telephony.protocol import ErrorKind, ProtocolError, StreamDecoder

START = p.encode_start(
    sequence_number=1,
    call_id="call-1",
    stream_id="s-1",
    account_id="MA1",
    extra_headers="agentId=abc;token=T1",
)


def _media(payload: bytes | str, **over: object) -> str:
    msg = {
        "event": "media",
        "sequenceNumber": 2,
        "streamId": "s-1",
        "media": {
            "track": "inbound",
            "timestamp": "1705312200000",
            "chunk": 1,
            "payload": payload if isinstance(payload, str) else base64.b64encode(payload).decode(),
        },
    }
    msg.update(over)
    return json.dumps(msg)


def _started() -> StreamDecoder:
    decoder = StreamDecoder()
    decoder.feed(START)
    return decoder


def test_start_as_plivo_documents_it() -> None:
    raw = (
        '{"event":"start","sequenceNumber":1,"start":{"callId":"c","streamId":"s","accountId":"MA...",'
        '"tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000}},'
        '"extra_headers":"agentId=abc,callUuid=xyz"}'
    )
    start = p.parse_event(raw)
    assert isinstance(start, p.Start)
    assert (start.call_id, start.stream_id, start.account_id) == ("c", "s", "MA...")
    assert start.media_format == p.MediaFormat("audio/x-mulaw", 8000)
    assert start.extra_headers == {"agentId": "abc", "callUuid": "xyz"}


def test_extra_headers_accept_both_separators() -> None:
    assert p.parse_extra_headers("a=1;b=2,c=3") == {"a": "1", "b": "2", "c": "3"}
    assert p.parse_extra_headers("") == {} and p.parse_extra_headers(None) == {}
    start = _started().start
    assert start is not None and start.extra_headers == {"agentId": "abc", "token": "T1"}


def test_media_dtmf_and_acks_decode() -> None:
    decoder = _started()
    media = decoder.feed(_media(b"\xff" * 160))
    assert isinstance(media, p.Media)
    assert media.payload == b"\xff" * 160 and media.timestamp_ms == 1705312200000 and media.chunk == 1
    dtmf = decoder.feed(
        '{"event":"dtmf","sequenceNumber":57,"streamId":"s-1","dtmf":{"track":"inbound","digit":"5","timestamp":"9"}}'
    )
    assert isinstance(dtmf, p.Dtmf) and dtmf.digit == "5" and dtmf.timestamp_ms == 9
    played = decoder.feed('{"event":"playedStream","sequenceNumber":60,"streamId":"s-1","name":"turn-3"}')
    assert played == p.PlayedStream(60, "s-1", "turn-3")
    assert decoder.feed(
        '{"event":"played","sequenceNumber":61,"streamId":"s-1","name":"t"}'
    ) == p.PlayedStream(61, "s-1", "t")
    assert decoder.feed('{"event":"clearedAudio","sequenceNumber":62,"streamId":"s-1"}') == p.ClearedAudio(
        62, "s-1"
    )
    assert decoder.feed('{"event":"stop","sequenceNumber":63,"streamId":"s-1"}') == p.Stop(63, "s-1")
    failed = decoder.feed(
        '{"event":"playFailed","sequenceNumber":64,"streamId":"s-1","name":"x","reason":"boom"}'
    )
    assert failed == p.PlayFailed(64, "s-1", "x", "boom")
    err = decoder.feed('{"event":"error","sequenceNumber":65,"streamId":"s-1","error":{"code":1}}')
    assert isinstance(err, p.StreamError) and "code" in err.reason


def test_l16_payload_must_be_whole_samples() -> None:
    decoder = StreamDecoder()
    decoder.feed(START.replace("audio/x-mulaw", "audio/x-l16").replace("8000", "16000"))
    assert isinstance(decoder.feed(_media(b"\0" * 640)), p.Media)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(_media(b"\0" * 641))
    assert info.value.kind is ErrorKind.BAD_SIZE and "whole number" in info.value.reason


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        ("{not json", ErrorKind.BAD_JSON),
        ("[1,2]", ErrorKind.BAD_JSON),
        (b"\xff\xfe", ErrorKind.BAD_JSON),
        (_media("!!!not base64!!!"), ErrorKind.BAD_BASE64),
        ('{"event":"wobble","sequenceNumber":3}', ErrorKind.UNKNOWN_EVENT),
        (_media(b""), ErrorKind.BAD_SIZE),
        (_media(b"\xff" * 9000), ErrorKind.BAD_SIZE),
        (
            '{"event":"media","sequenceNumber":2,"streamId":"s-1","media":{"timestamp":"1","chunk":1}}',
            ErrorKind.MISSING_FIELD,
        ),
        ('{"sequenceNumber":2}', ErrorKind.MISSING_FIELD),
        ('{"event":"dtmf","sequenceNumber":2,"dtmf":{}}', ErrorKind.MISSING_FIELD),
        ('{"event":"playedStream","sequenceNumber":2}', ErrorKind.MISSING_FIELD),
        (
            '{"event":"start","sequenceNumber":1,"start":{"callId":"c","streamId":"s"}}',
            ErrorKind.MISSING_FIELD,
        ),
        (_media(b"\xff" * 160, sequenceNumber="x"), ErrorKind.BAD_FIELD),
        ("x" * (70 * 1024), ErrorKind.BAD_SIZE),
    ],
)
def test_every_error_kind_is_typed_and_the_decoder_survives(frame: str | bytes, kind: ErrorKind) -> None:
    decoder = _started()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(frame)
    assert info.value.kind is kind and info.value.reason
    assert isinstance(decoder.feed(_media(b"\xff" * 160)), p.Media)  # the next good frame still parses


def test_media_before_start() -> None:
    with pytest.raises(ProtocolError) as info:
        StreamDecoder().feed(_media(b"\xff" * 160))
    assert info.value.kind is ErrorKind.MEDIA_BEFORE_START


def test_unsupported_start_format() -> None:
    with pytest.raises(ProtocolError) as info:
        p.parse_event(START.replace("8000", "44100"))
    assert info.value.kind is ErrorKind.BAD_FIELD


def test_play_audio_shape_and_limits() -> None:
    frame = json.loads(p.encode_play_audio(b"\x7f" * 320))
    assert frame == {
        "event": "playAudio",
        "media": {
            "contentType": "audio/x-mulaw",
            "sampleRate": 8000,
            "payload": base64.b64encode(b"\x7f" * 320).decode(),
        },
    }
    for bad in (b"", b"\x7f" * 100, b"\x7f" * 160 * (p.MAX_PLAY_FRAMES + 1)):
        with pytest.raises(ValueError):
            p.encode_play_audio(bad)
    audio = bytes(range(256)) * 100  # 25600 bytes = 160 frames
    frames = list(p.iter_play_audio(audio))
    assert len(frames) == 3
    joined = b""
    for text in frames:
        payload = json.loads(text)["media"]["payload"]
        assert len(payload) <= 16 * 1024 and len(text) <= 64 * 1024
        cmd = p.parse_command(text)
        assert isinstance(cmd, p.PlayAudio) and len(cmd.payload) % 160 == 0
        joined += cmd.payload
    assert joined == audio


def test_commands_match_plivo_md_shapes() -> None:
    assert json.loads(p.encode_checkpoint("s-1", "turn-3")) == {
        "event": "checkpoint",
        "streamId": "s-1",
        "name": "turn-3",
    }
    assert json.loads(p.encode_clear_audio("s-1")) == {"event": "clearAudio", "streamId": "s-1"}
    assert json.loads(p.encode_send_dtmf("1234#")) == {"event": "sendDTMF", "dtmf": "1234#"}
    assert p.parse_command(p.encode_checkpoint("s-1", "n"), "s-1") == p.Checkpoint("s-1", "n")
    assert p.parse_command(p.encode_clear_audio("s-1"), "s-1") == p.ClearAudio("s-1")
    assert p.parse_command(p.encode_send_dtmf("9"), "s-1") == p.SendDtmf("9")
    with pytest.raises(ValueError):
        p.encode_send_dtmf("12x")


@pytest.mark.parametrize(
    "frame",
    [
        '{"event":"checkpoint","streamId":"other","name":"n"}',
        '{"event":"checkpoint","streamId":"s-1"}',
        '{"event":"clearAudio","streamId":"s-1","extra":1}',
        '{"event":"playAudio","media":{"contentType":"audio/x-l16","sampleRate":8000,"payload":""}}',
        '{"event":"playAudio","media":{"contentType":"audio/x-mulaw","sampleRate":16000,"payload":"/w=="}}',
        '{"event":"playAudio","media":{"contentType":"audio/x-mulaw","sampleRate":8000,"payload":"/w=="}}',
        '{"event":"sendDTMF","dtmf":""}',
        '{"event":"speak","text":"hi"}',
    ],
)
def test_command_validation_rejects_off_spec_frames(frame: str) -> None:
    with pytest.raises(ProtocolError):
        p.parse_command(frame, "s-1")


def test_start_with_top_level_stream_id() -> None:
    raw = (
        '{"event":"start","sequenceNumber":1,"streamId":"s-top","start":{"callId":"c",'
        '"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000}}}'
    )
    start = p.parse_event(raw)
    assert isinstance(start, p.Start) and start.stream_id == "s-top" and start.tracks == ("inbound",)
