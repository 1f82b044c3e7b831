import pytest

from appliance.telephony.rest import PlivoApiError, PlivoRest
from tests.fakes.plivo_rest import FakePlivo


def _rest(fake: FakePlivo, token: str | None = None) -> PlivoRest:
    return PlivoRest(fake.auth_id, token or fake.auth_token, api_base_url=fake.base_url)


async def test_make_call_posts_what_plivo_needs(fake_plivo: FakePlivo) -> None:
    fired = await _rest(fake_plivo).make_call(
        "+14155550100",
        "+14155550199",
        "https://voice.example.com/v1/Account/MA1/Voiceagent/a1/talk/",
        hangup_url="https://voice.example.com/hangup/",
    )
    assert fired.message == "call fired" and fired.request_uuid == fake_plivo.placed[0].request_uuid
    assert fired.api_id
    body = fake_plivo.placed[0].params
    assert body["from"] == "+14155550100" and body["to"] == "+14155550199"
    assert body["answer_url"] == "https://voice.example.com/v1/Account/MA1/Voiceagent/a1/talk/"
    assert body["answer_method"] == "POST" and body["hangup_url"] == "https://voice.example.com/hangup/"
    assert fake_plivo.requests[0].path == f"/v1/Account/{fake_plivo.auth_id}/Call/"


async def test_hangup_live_call_then_404_is_not_an_error(fake_plivo: FakePlivo) -> None:
    rest = _rest(fake_plivo)
    fake_plivo.add_live_call("call-1")
    assert await rest.hangup("call-1") is True
    assert fake_plivo.hung_up == ["call-1"]
    assert await rest.hangup("call-1") is False  # already ended: 404
    assert [r.method for r in fake_plivo.requests] == ["DELETE", "DELETE"]


async def test_transfer_sends_legs_and_aleg_url(fake_plivo: FakePlivo) -> None:
    fake_plivo.add_live_call("call-2")
    await _rest(fake_plivo).transfer("call-2", "https://voice.example.com/transfer.xml")
    (req,) = fake_plivo.transfers
    assert req.call_uuid == "call-2" and req.body["legs"] == "aleg"
    assert (
        req.body["aleg_url"] == "https://voice.example.com/transfer.xml" and req.body["aleg_method"] == "POST"
    )
    with pytest.raises(PlivoApiError):
        await _rest(fake_plivo).transfer("unknown", "https://voice.example.com/t.xml")


async def test_wrong_token_and_bad_auth_id_raise_api_errors(fake_plivo: FakePlivo) -> None:
    with pytest.raises(PlivoApiError):
        await _rest(fake_plivo, token="wrong").make_call("+1415", "+1416", "https://x.example/a")
    assert fake_plivo.unauthorized == 1
    with pytest.raises(PlivoApiError):
        await PlivoRest("nope", "t", api_base_url=fake_plivo.base_url).hangup("c")


async def test_unreachable_api_raises_api_error() -> None:
    rest = PlivoRest("MAFAKEACCOUNT0000001", "t", api_base_url="http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(PlivoApiError):
        await rest.hangup("c")
