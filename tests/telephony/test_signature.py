from plivo.utils import validate_v3_signature

from appliance.telephony.signature import (
    NonceCache,
    SignatureVerifier,
    compute_signature,
    public_uri,
    signature_headers,
)

TOKEN = "sub-account-token"
MAIN = "main-account-token"
URI = "https://voice.example.com/v1/Account/MA1/Voiceagent/a1/talk/?b=2&a=1"
PARAMS = {"CallUUID": "c-1", "From": "+14155550100", "To": "+14155550199", "Direction": "inbound"}


def test_computed_signature_is_what_the_sdk_validates() -> None:
    sig = compute_signature("POST", URI, "12345", TOKEN, PARAMS)
    assert validate_v3_signature("POST", URI, "12345", TOKEN, sig, dict(PARAMS))
    get_sig = compute_signature("GET", URI, "12345", TOKEN)
    assert validate_v3_signature("GET", URI, "12345", TOKEN, get_sig, {})
    assert sig != get_sig


def test_valid_post_and_lowercase_method_and_case_insensitive_headers() -> None:
    headers = {k.lower(): v for k, v in signature_headers("POST", URI, TOKEN, PARAMS).items()}
    verdict = SignatureVerifier().verify("post", URI, headers, [TOKEN], PARAMS)
    assert verdict.ok, verdict.reason


def test_tampered_params_uri_or_token_fail() -> None:
    verifier = SignatureVerifier()
    headers = signature_headers("POST", URI, TOKEN, PARAMS)
    assert not verifier.verify("POST", URI, headers, [TOKEN], {**PARAMS, "To": "+10000000000"}).ok
    assert not verifier.verify("POST", URI.replace("https", "http"), headers, [TOKEN], PARAMS).ok
    assert not verifier.verify("POST", URI, headers, ["other"], PARAMS).ok
    assert not verifier.verify("GET", URI, headers, [TOKEN], PARAMS).ok
    assert verifier.verify("POST", URI, {}, [TOKEN], PARAMS).reason.startswith("missing")


def test_any_of_several_comma_separated_signatures_matches() -> None:
    headers = signature_headers("POST", URI, TOKEN, PARAMS)
    good = headers["X-Plivo-Signature-V3"]
    headers["X-Plivo-Signature-V3"] = f"bm90LWl0, {good}"
    assert SignatureVerifier().verify("POST", URI, headers, [TOKEN], PARAMS).ok


def test_main_account_signature_header_is_accepted() -> None:
    headers = signature_headers("POST", URI, TOKEN, PARAMS, main_account_token=MAIN)
    headers["X-Plivo-Signature-V3"] = "bm90LWl0"  # the subaccount one is wrong; the Ma one is right
    assert SignatureVerifier().verify("POST", URI, headers, [MAIN], PARAMS).ok


def test_replayed_nonce_is_refused_but_a_forged_request_does_not_burn_it() -> None:
    verifier = SignatureVerifier()
    headers = signature_headers("POST", URI, TOKEN, PARAMS, nonce="777")
    forged = {**headers, "X-Plivo-Signature-V3": "Zm9yZ2Vk"}
    assert not verifier.verify("POST", URI, forged, [TOKEN], PARAMS).ok
    assert verifier.verify("POST", URI, headers, [TOKEN], PARAMS).ok
    replay = verifier.verify("POST", URI, headers, [TOKEN], PARAMS)
    assert not replay.ok and "replay" in replay.reason


def test_nonce_cache_expires_and_is_bounded() -> None:
    now = [0.0]
    cache = NonceCache(ttl_s=10, max_entries=3, clock=lambda: now[0])
    assert cache.add("a") and not cache.add("a")
    now[0] = 11.0
    assert cache.add("a")  # stale entry forgotten after the TTL
    for n in "bcdef":
        assert cache.add(n)
    assert len(cache) <= 3


def test_websocket_upgrade_signed_as_get_on_wss_uri() -> None:
    ws_uri = "wss://voice.example.com/v1/Account/MA1/Voiceagent/a1/connect/?token=ABC"
    headers = signature_headers("GET", ws_uri, TOKEN)
    assert SignatureVerifier().verify("GET", ws_uri, headers, [TOKEN]).ok
    assert not SignatureVerifier().verify("GET", ws_uri.replace("ABC", "ABD"), headers, [TOKEN]).ok


def test_public_uri_is_rebuilt_from_the_configured_base() -> None:
    assert (
        public_uri("https://voice.example.com/prefix/", "/v1/x/talk/", "a=1")
        == "https://voice.example.com/prefix/v1/x/talk/?a=1"
    )
    assert public_uri("http://h:8000", "/p/") == "http://h:8000/p/"
