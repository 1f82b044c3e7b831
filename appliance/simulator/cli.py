"""Command line for the simulated Plivo caller (``scripts/simulate_call``).

Script items, in order:
  FILE.wav             say it after the agent's reply finishes (+ --pause ms)
  now:FILE.wav         say it without waiting for the agent
  pause:MS             stay quiet (line noise) for MS
  barge:MS:FILE.wav    talk over the agent once it has played MS of its reply
  noise:MS:FILE.wav    a cough/clap/backchannel over the agent after MS (should not interrupt)
  dtmf:DIGITS          press keys

With --base-url, --auth-id and --auth-token (the account's API credentials) the call's record (the
transcript as the appliance heard it, with its per-turn timings) is fetched afterwards and printed
under "record".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from appliance.simulator.audio import load_wav_8k
from appliance.simulator.caller import CallerOptions, Dtmf, Pause, Say, ScriptItem, run_call, save_result


def parse_item(text: str, pause_ms: int) -> ScriptItem:
    kind, _, rest = text.partition(":")
    if kind == "pause" and rest.isdigit():
        return Pause(int(rest))
    if kind == "dtmf" and rest:
        return Dtmf(rest, pause_ms=pause_ms, wait_for_agent=True)
    if kind == "now" and rest:
        return Say(Path(rest), pause_ms=0, wait_for_agent=False)
    if kind in ("barge", "noise"):
        ms, _, path = rest.partition(":")
        if not ms.isdigit() or not path:
            raise argparse.ArgumentTypeError(f"expected {kind}:MS:FILE.wav, got {text!r}")
        return Say(Path(path), barge_in_after_ms=int(ms), kind="noise" if kind == "noise" else "speech")
    if text.lower().endswith(".wav"):
        return Say(Path(text), pause_ms=pause_ms)
    raise argparse.ArgumentTypeError(f"unknown script item {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simulate_call", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--answer-url", help="the agent's answer URL (talk URL)")
    target.add_argument("--base-url", help="appliance base URL; with --auth-id and --agent")
    p.add_argument("--auth-id", help="account auth id (path of the talk URL)")
    p.add_argument("--auth-token", help="account auth token: fetch the call record afterwards")
    p.add_argument("--agent", help="agent id")
    p.add_argument("--plivo-auth-token", help="sign requests with this Plivo auth token (V3 signatures)")
    p.add_argument("--from", dest="from_number", default="+14155550100")
    p.add_argument("--to", dest="to_number", default="+14155550199")
    p.add_argument("--direction", choices=["inbound", "outbound"], default="inbound")
    p.add_argument(
        "--pause", type=int, default=400, help="ms between the agent's reply and the next utterance"
    )
    p.add_argument("--settle", type=int, default=800, help="agent silence (ms) that ends its reply")
    p.add_argument("--background", type=Path, help="WAV mixed under the caller's line (TV, other talker)")
    p.add_argument("--background-db", type=float, default=-20.0)
    p.add_argument("--noise-dbfs", type=float, default=-62.0, help="line noise level")
    p.add_argument("--max-call-s", type=float, default=600.0)
    p.add_argument("--out-wav", type=Path, help="save the agent's audio (8 kHz WAV)")
    p.add_argument("--out-json", type=Path, help="save the report")
    p.add_argument("items", nargs="+", help="script items (see above)")
    return p


async def fetch_record(base_url: str, auth_id: str, auth_token: str, call_uuid: str) -> Any:
    """The appliance's record of the call, once it is no longer live (or after ~15 s)."""
    url = f"{base_url.rstrip('/')}/v1/Account/{auth_id}/Call/{call_uuid}/"
    deadline = time.monotonic() + 15.0
    async with httpx.AsyncClient(timeout=10.0, auth=(auth_id, auth_token)) as client:
        while True:
            response = await client.get(url)
            body = (
                response.json()
                if response.headers.get("content-type", "").startswith("application/json")
                else {}
            )
            if response.status_code == 200 and body.get("status") != "live":
                return body
            if time.monotonic() > deadline:
                return {"http_status": response.status_code, **body}
            await asyncio.sleep(0.3)


async def _run(args: argparse.Namespace, options: CallerOptions, script: list[ScriptItem]) -> dict[str, Any]:
    result = await run_call(options, script)
    save_result(result, args.out_wav, args.out_json)
    report = result.to_json()
    if args.base_url and args.auth_id and args.auth_token and result.stream_url:
        try:
            report["record"] = await fetch_record(
                args.base_url, args.auth_id, args.auth_token, result.call_uuid
            )
        except (httpx.HTTPError, ValueError) as exc:
            report["record"] = {"error": str(exc)}
    report["ok"] = result.answer_status == 200 and not result.violations
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.answer_url:
        answer_url = args.answer_url
    else:
        if not (args.auth_id and args.agent):
            print("--base-url needs --auth-id and --agent", file=sys.stderr)
            return 2
        answer_url = f"{args.base_url.rstrip('/')}/v1/Account/{args.auth_id}/Voiceagent/{args.agent}/talk/"
    try:
        script = [parse_item(item, args.pause) for item in args.items]
    except argparse.ArgumentTypeError as exc:
        print(exc, file=sys.stderr)
        return 2
    options = CallerOptions(
        answer_url=answer_url,
        from_number=args.from_number,
        to_number=args.to_number,
        direction=args.direction,
        auth_token=args.plivo_auth_token,
        agent_settle_ms=args.settle,
        background=load_wav_8k(args.background) if args.background else None,
        background_db=args.background_db,
        noise_level_dbfs=args.noise_dbfs,
        max_call_s=args.max_call_s,
    )
    if args.auth_id:
        options.account_id = args.auth_id
    report = asyncio.run(_run(args, options, script))
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1
