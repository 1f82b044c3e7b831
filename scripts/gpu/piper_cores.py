"""Time the Piper voice on a machine's CPU cores: one clause's latency, and speech per second with workers.

Piper stays on the CPU in a GPU box (onnxruntime's CPU provider), so the box's cores bound how much
speech it can synthesize. This needs only numpy and onnxruntime, so it runs on a bare GPU box too. The
phoneme ids of real clauses come from ``piper_ids.json`` beside it, written here with
``--make-ids`` (needs the appliance's venv, which has piper and espeak-ng):

    .venv/bin/python scripts/gpu/piper_cores.py --make-ids
    python3 scripts/gpu/piper_cores.py --voice models/tts/piper-joe-medium --out piper.json

Sessions are set up as the appliance sets them up (no memory arena, no spinning threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

IDS_FILE = Path(__file__).with_name("piper_ids.json")
CLAUSES = {
    "short": "You have eight of spades.",
    "long": (
        "Your order ships tomorrow morning, and you will get a text message when it leaves the warehouse."
    ),
}


def make_ids(voice_dir: Path) -> None:
    from piper import PiperVoice

    voice = PiperVoice.load(voice_dir / "voice.onnx")
    ids = {}
    for name, text in CLAUSES.items():
        sentence_ids: list[int] = []
        for phonemes in voice.phonemize(text):
            sentence_ids += voice.phonemes_to_ids(phonemes)
        ids[name] = sentence_ids
    IDS_FILE.write_text(json.dumps(ids))
    print(f"{IDS_FILE}: " + ", ".join(f"{k} {len(v)} ids" for k, v in ids.items()))


def session(voice_dir: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        str(voice_dir / "voice.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )


def synthesize(sess: ort.InferenceSession, ids: list[int], sample_rate: int) -> float:
    """Run the voice once; return the seconds of audio it made."""
    audio = sess.run(
        None,
        {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": np.array([0.667, 1.0, 0.8], dtype=np.float32),
        },
    )[0]
    return float(audio.size) / sample_rate


def latency(
    voice_dir: Path, ids: dict[str, list[int]], sample_rate: int, repeats: int
) -> list[dict[str, Any]]:
    rows = []
    for threads in (1, 2, 4):
        sess = session(voice_dir, threads)
        for name, clause_ids in ids.items():
            synthesize(sess, clause_ids, sample_rate)
            seconds, audio = [], 0.0
            for _ in range(repeats):
                start = time.perf_counter()
                audio = synthesize(sess, clause_ids, sample_rate)
                seconds.append(time.perf_counter() - start)
            row = {
                "test": "latency",
                "threads": threads,
                "clause": name,
                "audio_s": round(audio, 2),
                "p50_ms": round(statistics.median(seconds) * 1000, 1),
                "max_ms": round(max(seconds) * 1000, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def throughput(
    voice_dir: Path, ids: list[int], sample_rate: int, workers: int, seconds: float
) -> dict[str, Any]:
    """Workers each with a one-thread session, synthesizing back to back: audio seconds per wall second."""
    sessions = [session(voice_dir, 1) for _ in range(workers)]
    for sess in sessions:
        synthesize(sess, ids, sample_rate)
    produced = [0.0] * workers
    stop = time.perf_counter() + seconds

    def work(index: int) -> None:
        while time.perf_counter() < stop:
            produced[index] += synthesize(sessions[index], ids, sample_rate)

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    row = {
        "test": "throughput",
        "workers": workers,
        "audio_s_per_s": round(sum(produced) / wall, 1),
        "per_worker": round(sum(produced) / wall / workers, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--voice", type=Path, default=Path("models/tts/piper-joe-medium"))
    parser.add_argument("--make-ids", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workers", default="1,2,4,8,16")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", default="piper-cores.json")
    args = parser.parse_args(argv)
    if args.make_ids:
        make_ids(args.voice)
        return 0
    ids = json.loads(IDS_FILE.read_text())
    sample_rate = json.loads((args.voice / "voice.onnx.json").read_text())["audio"]["sample_rate"]
    machine = {"cpus": os.cpu_count(), "onnxruntime": ort.__version__}
    print(json.dumps(machine), flush=True)
    rows = latency(args.voice, ids, sample_rate, args.repeats)
    for workers in (int(w) for w in args.workers.split(",")):
        rows.append(throughput(args.voice, ids["long"], sample_rate, workers, args.seconds))
    with open(args.out, "w") as out:
        json.dump({"machine": machine, "rows": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
