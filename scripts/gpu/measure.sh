#!/usr/bin/env bash
# Measure the appliance's GPU-side stage costs on a lent GPU box that has CUDA's compiler, PyTorch and
# transformers but no network, no appliance packages and no room for our models (see docs/capacity.md).
#
# Prepare here (repo root), into an ignored folder that travels with the command:
#   vendor/llama.cpp from the llama-cpp-python sdist our setup installs -> .gpu/llama.cpp
#   python3 scripts/gpu/skeleton_gguf.py cut models/llm/qwen2.5-coder-0.5b/model.gguf .gpu/qwen.header
# Run there:
#   OUT=results scripts/gpu/measure.sh .gpu
#
# Builds llama.cpp with CUDA (llama-bench, llama-batched-bench) on all but two cores while PyTorch times
# Whisper- and Qwen-shaped networks on the other two, then times the same-shaped Qwen GGUF (random
# weights) in llama.cpp: one sequence, and 1..64 sequences decoded together as concurrent calls would be.
set -u
SRC=${1:-.gpu}
OUT=${OUT:-gpu-results}
DEADLINE_S=${BUILD_DEADLINE_S:-450}
mkdir -p "$OUT"
start=$SECONDS
log() { echo "[$((SECONDS - start)) s] $*"; }
pin() { # pin CORES COMMAND...: keep the build off the cores that time the GPU
    if command -v taskset >/dev/null; then taskset -c "$@"; else shift && "$@"; fi
}

command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/machine.txt"
{ echo "cpus $(nproc)"; python3 -V; nvcc --version | tail -1; } | tee -a "$OUT/machine.txt"

cores=$(nproc)
build_cores="2-$((cores - 1))"
(
    pin "$build_cores" cmake -S "$SRC/llama.cpp" -B /tmp/llama-build -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF &&
        pin "$build_cores" cmake --build /tmp/llama-build --target llama-bench llama-batched-bench \
            -j "$((cores - 2))"
    echo "build rc $?"
) >"$OUT/build.log" 2>&1 &
build=$!

python3 scripts/gpu/skeleton_gguf.py grow "$SRC/qwen.header" /tmp/qwen-zero.gguf
log "model written; timing PyTorch networks"
PYTHONUNBUFFERED=1 pin 0-1 python3 scripts/gpu/torch_stages.py --out "$OUT/torch-stages.json" \
    --repeats 5 --batches 1,4,16,32 >"$OUT/torch.log" 2>&1
log "PyTorch done (rc $?)"

while kill -0 "$build" 2>/dev/null && ((SECONDS - start < DEADLINE_S)); do sleep 5; done
if kill -0 "$build" 2>/dev/null; then
    log "llama.cpp build not finished after ${DEADLINE_S} s: $(grep -c Building "$OUT/build.log") steps"
    pkill -f ninja || kill "$build"
    exit 3
fi
tail -n 2 "$OUT/build.log"
bin=/tmp/llama-build/bin
log "llama-bench"
"$bin/llama-bench" -m /tmp/qwen-zero.gguf -ngl 99 -fa 1 -p 16,64,256,1024 -n 32 -r 5 \
    >"$OUT/llama-bench.md" 2>"$OUT/llama-bench.err"
cat "$OUT/llama-bench.md"
log "llama-batched-bench"
"$bin/llama-batched-bench" -m /tmp/qwen-zero.gguf -ngl 99 -fa on -c 65536 -b 2048 -ub 512 \
    -npp 64,256 -ntg 32 -npl 1,2,4,8,16,32,64 >"$OUT/batched.txt" 2>&1
grep -E '^\|' "$OUT/batched.txt"
log "done"
