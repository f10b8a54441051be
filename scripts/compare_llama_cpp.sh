#!/usr/bin/env bash
# Side-by-side speed and memory: kvmerger against llama.cpp on the same GGUF files,
# the same thread count, on this machine, in one run.
#
# llama.cpp is built once from the `llama-cpp-python` source package (which vendors
# llama.cpp) into a cache directory outside the repository; nothing of it is kept in
# the repository.
#
# Usage:
#   scripts/compare_llama_cpp.sh [--models smollm2-135m,qwen2.5-0.5b] [--threads 2]
#                                [--depth 4096] [--reps 2] [--build-only] [--quick]
#                                [--pp 512] [--prompt-only] [-- extra kvmerger bench flags]
#
#   --pp N          prompt tokens of the prompt-processing test (default 512)
#   --prompt-only   only prompt processing (and its peak RSS): no generation tests,
#                   e.g. `--pp 4096 --prompt-only --reps 1`
#
# Environment:
#   KVMERGER_HOME   the kvmerger data directory (models are read from $KVMERGER_HOME/models)
#   LLAMA_CPP_DIR   where llama.cpp is built (default: $KVMERGER_HOME/llama.cpp)
#   KVMERGER_BIN    the kvmerger binary (default: built with cargo --release)
#   KVMERGER_KERNELS  kvmerger's kernel family (avx512, avx2; see docs/performance.md).
#                   With `avx2`, llama.cpp is a second build with AVX2 as its widest
#                   instructions (no AVX-512, no VNNI; $LLAMA_CPP_DIR/build-avx2), so
#                   that an AVX-512 machine measures both programs as an AVX2-only
#                   server would run them.
#   LLAMA_BENCH_ARGS  extra llama-bench flags
#   OMP_WAIT_POLICY   unset (the default): every llama.cpp test runs twice, with
#                   OpenMP's default wait policy (threads spin at barriers) and with
#                   `passive` (they sleep), and the faster of the two is compared, its
#                   policy named beside it. Neither is right everywhere: on a busy
#                   machine spinning threads waiting for a descheduled one make
#                   llama.cpp's generation 10-20x slower, and on an idle one `passive`
#                   collapses its two-thread generation (smollm2 38.9 against 92.6
#                   tok/s at one thread), so one fixed policy can fake a large ratio.
#                   Set it (`active` or `passive`) to run llama.cpp under that one only.
#
# Both programs are timed in this one run on this machine; other jobs on it slow both,
# llama.cpp more (its threads spin at barriers). The load average is printed before and
# after: trust ratios taken at a load near or below the thread count.
# Needs: pip, cmake, a C/C++ compiler (Debian: cmake, g++), /usr/bin/time.
# AMX is turned off in the llama.cpp build (its kernels crash on these VMs); AVX-512
# and VNNI stay on where the CPU has them.
set -euo pipefail

HOME_DIR="${KVMERGER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/kvmerger}"
LLAMA_DIR="${LLAMA_CPP_DIR:-$HOME_DIR/llama.cpp}"
MODELS="smollm2-135m,qwen2.5-0.5b"
THREADS=2
DEPTH=4096
REPS=2
BUILD_ONLY=0
QUICK=0
PP=512
PROMPT_ONLY=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --models) MODELS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --depth) DEPTH="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --quick) QUICK=1; shift ;;
        --pp) PP="$2"; shift 2 ;;
        --prompt-only) PROMPT_ONLY=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n 2,25p "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

# The llama.cpp build: native (every instruction this CPU has), or AVX2 at most when
# kvmerger's kernels are forced to avx2.
if [ "${KVMERGER_KERNELS:-}" = avx2 ]; then
    LLAMA_BUILD="$LLAMA_DIR/build-avx2"
    LLAMA_ISA=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
               -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_BF16=OFF)
else
    LLAMA_BUILD="$LLAMA_DIR/build"
    LLAMA_ISA=(-DGGML_NATIVE=ON)
fi
LLAMA_BENCH="$LLAMA_BUILD/bin/llama-bench"

# The version whose vendored llama.cpp scripts/fetch_vocab_tests.sh also reads.
LLAMA_CPP_PYTHON_VERSION=0.3.36

build_llama_cpp() {
    if [ -x "$LLAMA_BENCH" ]; then
        return
    fi
    for tool in cmake c++; do
        if ! command -v "$tool" >/dev/null; then
            echo "building llama.cpp needs $tool (Debian: apt install cmake g++; or pip install cmake)" >&2
            exit 1
        fi
    done
    mkdir -p "$LLAMA_DIR/src"
    local tarball
    tarball=$(ls "$LLAMA_DIR"/src/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz 2>/dev/null | head -1 || true)
    if [ -z "$tarball" ]; then
        echo "== downloading the llama-cpp-python source package" >&2
        # Only the package itself from source: `--no-binary :all:` would also build its
        # build dependencies (CMake among them) from source, which takes most of an hour.
        python3 -m pip download "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" --no-deps \
            --no-binary llama-cpp-python -d "$LLAMA_DIR/src" >&2
        tarball=$(ls "$LLAMA_DIR"/src/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz | head -1)
    fi
    local srcdir="$LLAMA_DIR/src/$(basename "$tarball" .tar.gz)"
    if [ ! -d "$srcdir" ]; then
        tar xzf "$tarball" -C "$LLAMA_DIR/src"
    fi
    echo "== building llama-bench from $(basename "$srcdir") (vendored llama.cpp; ${LLAMA_ISA[*]})" >&2
    # GGML_NATIVE compiles for this CPU, AMX included where it has it, whatever the
    # GGML_AMX_* options say; its AMX kernels crash here (the VM does not grant the
    # tile state), so the compiler is told not to use AMX at all.
    local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake -S "$srcdir/vendor/llama.cpp" -B "$LLAMA_BUILD" \
        -DCMAKE_BUILD_TYPE=Release "${LLAMA_ISA[@]}" \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
        -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
    cmake --build "$LLAMA_BUILD" --target llama-bench -j "$(nproc)" >&2
}

build_llama_cpp
if [ "$BUILD_ONLY" = 1 ]; then
    echo "llama-bench: $LLAMA_BENCH"
    exit 0
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${KVMERGER_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release -q -p kvmerger)
    KVMERGER_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/kvmerger"
fi

# tok/s of one llama-bench test (JSON output), by n_prompt, n_gen, n_depth.
llama_ts() { # file n_prompt n_gen n_depth
    python3 - "$@" <<'EOF'
import json, sys
f, p, g, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for r in json.load(open(f)):
    if r["n_prompt"] == p and r["n_gen"] == g and r.get("n_depth", 0) == d:
        print(f'{r["avg_ts"]:.2f}')
        break
else:
    print("nan")
EOF
}
# llama-bench with the given flags once per wait policy in POLICIES: JSON to
# $WORK/<tag>.<policy>.json; /usr/bin/time's report of the first policy's run to
# $WORK/<tag>.time (peak RSS does not depend on the policy).
llama_runs() { # tag llama-bench flags...
    local tag="$1" first=1 policy
    shift
    for policy in "${POLICIES[@]}"; do
        if [ "$policy" = default ]; then
            timed "$WORK/$tag.$policy.json" "$WORK/$tag.$policy.time" env -u OMP_WAIT_POLICY "$LLAMA_BENCH" -m "$gguf" -t "$THREADS" "$@" -o json ${LLAMA_BENCH_ARGS:-}
        else
            timed "$WORK/$tag.$policy.json" "$WORK/$tag.$policy.time" env OMP_WAIT_POLICY="$policy" "$LLAMA_BENCH" -m "$gguf" -t "$THREADS" "$@" -o json ${LLAMA_BENCH_ARGS:-}
        fi
        [ "$first" = 1 ] && cp "$WORK/$tag.$policy.time" "$WORK/$tag.time"
        first=0
    done
}
# The fastest tok/s of one test over the wait policies, with the policy that gave it
# and the others' speeds: "41.2 (default; passive 26.1)".
llama_best() { # tag n_prompt n_gen n_depth
    local tag="$1" policy ts best="" bp="" others=""
    shift
    for policy in "${POLICIES[@]}"; do
        ts=$(llama_ts "$WORK/$tag.$policy.json" "$@")
        if [ -z "$best" ] || python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)" "$ts" "$best"; then
            [ -n "$best" ] && others="$others; $bp $best"
            best="$ts"; bp="$policy"
        else
            others="$others; $policy $ts"
        fi
    done
    if [ "${#POLICIES[@]}" -gt 1 ]; then
        echo "$best ($bp$others)"
    else
        echo "$best"
    fi
}
# tok/s from a kvmerger bench table row whose label starts with $2.
kv_ts() { awk -F'|' -v l="$2" '{gsub(/^ +| +$/, "", $2)} $2 == l {gsub(/ /, "", $5); print $5; exit}' "$1"; }
# peak RSS (MiB) from /usr/bin/time -v output.
rss_mib() { awk '/Maximum resident set size/ {printf "%.1f", $NF / 1024}' "$1"; }
# kvmerger's own peak RSS line (VmHWM, the same measure), printed before `bench` runs
# its memory-bandwidth read loop, whose 512 MiB buffer would otherwise be counted.
kv_rss_mib() { awk '/^peak resident memory:/ {print $4; exit}' "$1"; }
ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.2f}' if b > 0 else 'nan')" "$1" "$2"; }

# Runs a command under /usr/bin/time -v, stdout to $1 and stderr to $2; when it fails,
# says which and shows the end of its error output instead of stopping silently.
timed() { # out err cmd...
    local out="$1" err="$2"
    shift 2
    if ! /usr/bin/time -v "$@" >"$out" 2>"$err"; then
        echo "failed: $* (its last error lines below)" >&2
        grep -v -E '^\s+(Command being timed|User time|System time|Percent of CPU|Elapsed|Average|Maximum|Major|Minor|Voluntary|Involuntary|Swaps|File system|Socket|Signals|Page size|Exit status)' "$err" | tail -15 >&2
        case "$*" in
            *llama-bench*) echo "(a llama-bench built by an older version of this script may use AMX, which crashes on some VMs: delete $LLAMA_BUILD to rebuild it)" >&2 ;;
        esac
        exit 1
    fi
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
case "$PP" in ''|*[!0-9]*) echo "--pp wants a positive number of tokens, not '$PP'" >&2; exit 2 ;; esac
[ "$PP" -gt 0 ] || { echo "--pp wants a positive number of tokens" >&2; exit 2; }
TG=128
[ "$QUICK" = 1 ] && TG=32
[ "$PROMPT_ONLY" = 1 ] && TG=0
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; threads $THREADS; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ -n "${OMP_WAIT_POLICY:-}" ]; then
    POLICIES=("$OMP_WAIT_POLICY")
else
    POLICIES=(default passive)
fi
echo "llama.cpp: $LLAMA_BENCH ${LLAMA_BENCH_ARGS:-} (OMP_WAIT_POLICY: ${POLICIES[*]}; the faster run of each test counts)"
echo "kvmerger: $KVMERGER_BIN ${EXTRA[*]} (kernels: ${KVMERGER_KERNELS:-the widest this CPU runs})"
echo
SUMMARY="$WORK/summary"
printf "| model | test | llama.cpp tok/s | kvmerger tok/s | kvmerger / llama.cpp |\n|---|---|---|---|---|\n" >"$SUMMARY"
IFS=',' read -r -a MODEL_LIST <<<"$MODELS"
for id in "${MODEL_LIST[@]}"; do
    gguf="$HOME_DIR/models/$id.gguf"
    if [ ! -f "$gguf" ]; then
        echo "missing $gguf (kvmerger fetch $id)" >&2
        exit 1
    fi
    echo "== $id: llama.cpp"
    # pp512 and tg128 right after it (one process, so its peak RSS is for a 640-token
    # context); with --prompt-only, the prompt alone (TG is 0).
    llama_runs l1 -p $PP -n $TG -r "$REPS"
    l_pp=$(llama_best l1 $PP 0 0)
    if [ "$TG" -gt 0 ]; then
        llama_runs l2 -p 0 -n $TG -d "$DEPTH" -r 1
        l_tg=$(llama_best l1 0 $TG 0)
        l_tgd=$(llama_best l2 0 $TG "$DEPTH")
        echo "pp$PP $l_pp tok/s, tg$TG $l_tg tok/s, tg$TG @ depth $DEPTH $l_tgd tok/s; peak RSS $(rss_mib "$WORK/l1.time") MiB (ctx $((PP + TG))), $(rss_mib "$WORK/l2.time") MiB (ctx $((DEPTH + TG)))"
    else
        echo "pp$PP $l_pp tok/s; peak RSS $(rss_mib "$WORK/l1.time") MiB"
    fi

    echo "== $id: kvmerger"
    timed "$WORK/k1.txt" "$WORK/k1.time" "$KVMERGER_BIN" -t "$THREADS" bench -m "$gguf" --pp $PP --tg $TG --reps "$REPS" "${EXTRA[@]}"
    cat "$WORK/k1.txt"
    k_pp=$(kv_ts "$WORK/k1.txt" "pp$PP")
    l_r1=$(rss_mib "$WORK/l1.time"); k_r1=$(kv_rss_mib "$WORK/k1.txt")
    echo "| $id | pp$PP | $l_pp | $k_pp | $(ratio "$k_pp" "${l_pp%% *}") |" >>"$SUMMARY"
    if [ "$TG" -gt 0 ]; then
        timed "$WORK/k2.txt" "$WORK/k2.time" "$KVMERGER_BIN" -t "$THREADS" bench -m "$gguf" --pp 0 --tg $TG --ctx "$DEPTH" "${EXTRA[@]}"
        cat "$WORK/k2.txt"
        k_tg=$(kv_ts "$WORK/k1.txt" "tg$TG")
        k_tgd=$(kv_ts "$WORK/k2.txt" "tg$TG @ ctx $DEPTH")
        l_r2=$(rss_mib "$WORK/l2.time"); k_r2=$(kv_rss_mib "$WORK/k2.txt")
        {
            echo "| $id | tg$TG | $l_tg | $k_tg | $(ratio "$k_tg" "${l_tg%% *}") |"
            echo "| $id | tg$TG @ $DEPTH | $l_tgd | $k_tgd | $(ratio "$k_tgd" "${l_tgd%% *}") |"
        } >>"$SUMMARY"
    fi
    echo "| $id | peak RSS MiB, ctx $((PP + TG)) (lower is better) | $l_r1 | $k_r1 | $(ratio "$k_r1" "$l_r1") |" >>"$SUMMARY"
    if [ "$TG" -gt 0 ]; then
        echo "| $id | peak RSS MiB, ctx $((DEPTH + TG)) (lower is better) | $l_r2 | $k_r2 | $(ratio "$k_r2" "$l_r2") |" >>"$SUMMARY"
    fi
    echo
done
echo "== ratios (threads $THREADS; tok/s ratios above 1 mean kvmerger is faster; load average at end: $(cut -d' ' -f1-3 /proc/loadavg))"
cat "$SUMMARY"
