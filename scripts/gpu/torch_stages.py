"""Time Whisper tiny.en and Qwen2.5-0.5B shaped networks with PyTorch on a GPU, batched as calls would be.

For a GPU box that has PyTorch and transformers but neither the appliance's packages nor its models
(see ``skeleton_gguf.py``): the networks are built from their published shapes with random weights, so
only the timings mean anything. The appliance itself runs Whisper through CTranslate2 and the LLM
through llama.cpp; these eager PyTorch timings are an upper bound on what those engines need on the
same GPU (eager mode pays one kernel launch per operation).

    python3 scripts/gpu/torch_stages.py --out stages.json

Prints one line per measurement and writes them all as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig, WhisperForConditionalGeneration

MEL_FRAMES_PER_SECOND = 100


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up: kernels chosen, memory pooled
    _sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _summary(name: str, seconds: list[float], **fields: Any) -> dict[str, Any]:
    ordered = sorted(seconds)
    row = {
        "name": name,
        **fields,
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000, 2),
        "runs": len(ordered),
    }
    print(json.dumps(row), flush=True)
    return row


def whisper_tiny_en(window_seconds: float) -> WhisperForConditionalGeneration:
    positions = int(window_seconds * MEL_FRAMES_PER_SECOND) // 2
    config = WhisperConfig(
        vocab_size=51864,
        num_mel_bins=80,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        d_model=384,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        max_source_positions=positions,
        max_target_positions=448,
    )
    return WhisperForConditionalGeneration(config)


def bench_whisper(
    device: torch.device, batches: list[int], tokens: int, repeats: int
) -> list[dict[str, Any]]:
    rows = []
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for window in (8.0, 30.0):
        model = whisper_tiny_en(window).to(device=device, dtype=dtype).eval()
        frames = int(window * MEL_FRAMES_PER_SECOND)
        for batch in batches:
            features = torch.randn(batch, 80, frames, device=device, dtype=dtype)

            def encode(features: torch.Tensor = features, model: Any = model) -> torch.Tensor:
                with torch.inference_mode():
                    return model.model.encoder(features).last_hidden_state

            rows.append(
                _summary("whisper_encoder", _timed(encode, device, repeats), window_s=window, batch=batch)
            )
            encoded = encode()

            def transcribe(encoded: torch.Tensor = encoded, model: Any = model, batch: int = batch) -> None:
                with torch.inference_mode():
                    ids = torch.full((batch, 4), 50257, device=device, dtype=torch.long)  # prompt tokens
                    out = model(decoder_input_ids=ids, encoder_outputs=(encoded,), use_cache=True)
                    past = out.past_key_values
                    for _ in range(tokens):
                        next_ids = out.logits[:, -1:].argmax(-1)
                        out = model(
                            decoder_input_ids=next_ids,
                            encoder_outputs=(encoded,),
                            past_key_values=past,
                            use_cache=True,
                        )
                        past = out.past_key_values

            rows.append(
                _summary(
                    "whisper_decode",
                    _timed(transcribe, device, repeats),
                    window_s=window,
                    batch=batch,
                    tokens=tokens,
                )
            )
        del model
    return rows


def qwen25_05b() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    )
    return Qwen2ForCausalLM(config)


def bench_qwen(
    device: torch.device, batches: list[int], prompt: int, tokens: int, repeats: int
) -> list[dict[str, Any]]:
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = qwen25_05b().to(device=device, dtype=dtype).eval()
    for batch in batches:
        ids = torch.randint(0, 151000, (batch, prompt), device=device)

        def prefill(ids: torch.Tensor = ids) -> Any:
            with torch.inference_mode():
                return model(input_ids=ids, use_cache=True)

        rows.append(_summary("qwen_prefill", _timed(prefill, device, repeats), batch=batch, prompt=prompt))

        def generate(ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                out = model(input_ids=ids, use_cache=True)
                past = out.past_key_values
                for _ in range(tokens):
                    out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=past, use_cache=True)
                    past = out.past_key_values

        total = _timed(generate, device, repeats)
        prefill_p50 = statistics.median(_timed(prefill, device, repeats))
        per_step = [(seconds - prefill_p50) / tokens for seconds in total]
        rows.append(_summary("qwen_decode_step", per_step, batch=batch, prompt=prompt, tokens=tokens))
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default="torch-stages.json")
    parser.add_argument("--batches", default="1,4,8,16,32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--asr-tokens", type=int, default=20)
    parser.add_argument("--llm-prompt", type=int, default=400)
    parser.add_argument("--llm-tokens", type=int, default=30)
    args = parser.parse_args(argv)
    device = _device()
    batches = [int(b) for b in args.batches.split(",")]
    machine = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    print(json.dumps(machine), flush=True)
    torch.manual_seed(0)
    rows = bench_whisper(device, batches, args.asr_tokens, args.repeats)
    rows += bench_qwen(device, batches, args.llm_prompt, args.llm_tokens, args.repeats)
    with open(args.out, "w") as out:
        json.dump({"machine": machine, "rows": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
