import xml.etree.ElementTree as ET

import pytest

from appliance.telephony.xml import (
    apology_xml,
    check_extra_headers,
    parse_stream_xml,
    stream_xml,
    websocket_url,
)


def test_stream_xml_has_exact_attributes_and_parses_back() -> None:
    url = "wss://voice.example.com/v1/Account/MA1/Voiceagent/a1/connect/?token=ABC&x=1"
    xml = stream_xml(
        url,
        extra_headers={"token": "ABC234", "v": "1"},
        status_callback_url="https://voice.example.com/cb",
    )
    root = ET.fromstring(xml)
    assert root.tag == "Response" and [c.tag for c in root] == ["Stream"]
    stream = root[0]
    assert stream.attrib == {
        "bidirectional": "true",
        "keepCallAlive": "true",
        "audioTrack": "inbound",
        "contentType": "audio/x-mulaw;rate=8000",
        "statusCallbackUrl": "https://voice.example.com/cb",
        "statusCallbackMethod": "POST",
        "extraHeaders": "token=ABC234,v=1",
    }
    assert stream.text == url  # & is escaped in the XML and comes back intact
    parsed = parse_stream_xml(xml)
    assert parsed.url == url and parsed.extra_headers == {"token": "ABC234", "v": "1"}


def test_stream_xml_without_optionals_omits_them() -> None:
    attrs = parse_stream_xml(stream_xml("ws://127.0.0.1:8000/x")).attributes
    assert "statusCallbackUrl" not in attrs and "extraHeaders" not in attrs
    assert "statusCallbackMethod" not in attrs and attrs["bidirectional"] == "true"


@pytest.mark.parametrize(
    "headers",
    [{"token": "a-b"}, {"to": "+14155550100"}, {"k": "x" * 600}, {"bad key": "1"}],
)
def test_extra_headers_limits(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        check_extra_headers(headers)


def test_stream_url_limits() -> None:
    with pytest.raises(ValueError):
        stream_xml("wss://h/" + "a" * 2050)
    with pytest.raises(ValueError):
        stream_xml("https://h/not-a-websocket")


def test_apology_speaks_then_hangs_up() -> None:
    root = ET.fromstring(apology_xml("We are busy."))
    assert [c.tag for c in root] == ["Speak", "Hangup"]
    assert root[0].text == "We are busy."
    with pytest.raises(ValueError):
        parse_stream_xml(apology_xml())


def test_websocket_url_maps_scheme_and_keeps_prefix() -> None:
    assert websocket_url("https://a.example/voice/", "/v1/x/", "t=1") == "wss://a.example/voice/v1/x/?t=1"
    assert websocket_url("http://127.0.0.1:8000", "v1/x/") == "ws://127.0.0.1:8000/v1/x/"
