import pytest

from appliance.telephony.callbacks import parse_hangup, parse_stream_status


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        ("StartStream", "started"),
        ("started", "started"),
        ("StopStream", "stopped"),
        ("stopped", "stopped"),
        ("DroppedStream", "failed"),
        ("failed", "failed"),
        ("DegradedStream", "degraded"),
        ("Wobble", "unknown"),
        ("", "unknown"),
    ],
)
def test_both_stream_status_vocabularies(event: str, kind: str) -> None:
    status = parse_stream_status({"Event": event, "CallUUID": "c1", "StreamID": "s1", "BillRate": "0.1"})
    assert status.kind == kind and status.call_uuid == "c1" and status.stream_id == "s1"


def test_hangup_fields_and_garbage_durations() -> None:
    h = parse_hangup(
        {"CallUUID": "c1", "HangupCause": "NORMAL_CLEARING", "Duration": "42", "BillDuration": "60"}
    )
    assert (h.call_uuid, h.cause, h.duration_s, h.bill_duration_s) == ("c1", "NORMAL_CLEARING", 42, 60)
    assert parse_hangup({"Duration": "x"}).duration_s is None
