#!/usr/bin/env python3
"""Load test of `kvmerger serve` from a second process, on loopback only.

Starts the server (port 0, loopback), warms it up, records its idle resident memory,
then sends N concurrent streaming chat requests with the official openai package's
async client, sampling the server's VmRSS and /metrics while they run. Afterwards it
checks that every request either succeeded or was refused with the documented 503/429,
that resident memory returned to its idle level, and (with compression) that /metrics
reports KV memory saved. Prints a JSON summary; exits non-zero when a check fails.

Bounded: a fixed number of requests, each with a timeout, and an overall deadline.

  python3 scripts/load_test.py --requests 32 --max-tokens 32 \
      --kv-compression '{"method": "kvmerger", "budget": 0.5}' --kv-memory 96MiB
"""

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request

from serve_process import conclude, rss_kib, start, stop

try:
    import openai
    from openai import AsyncOpenAI
except ImportError as e:
    sys.exit(f"the openai package is missing ({e}): "
             "python3 -m pip install -r scripts/requirements-reference.txt")

TOPICS = ["a lighthouse keeper", "a clockmaker", "a beekeeper", "a mountain guide",
          "a ferry captain", "a librarian", "a glassblower", "a shepherd"]


def metrics(base):
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def document_for(d, words):
    """Document d of about `words` words, for clients that ask about shared documents."""
    topic = TOPICS[d % len(TOPICS)]
    text, k = f"Notes on {topic} (document {d}).\n", 0
    while len(text.split()) < words:
        text += (f"Day {k}: {topic} mended {k % 7 + 1} nets, sold {k * 3 % 11 + 2} jars and "
                 f"walked {k % 5 + 3} miles along the river.\n")
        k += 1
    return text


def messages_for(i, args):
    if args.documents:
        doc = document_for(i % args.documents, args.prompt_words)
        return [{"role": "system", "content": doc},
                {"role": "user", "content": f"How many jars were sold on day {i % 17}?"}]
    return [{"role": "user", "content": prompt_for(i, args.prompt_words)}]


def prompt_for(i, words):
    topic = TOPICS[i % len(TOPICS)]
    base = (f"Story {i}: {topic} lives at the edge of a quiet town, keeps a careful "
            f"notebook of every day's work, and tells visitors about the weather, the "
            f"river and the old bridge. ")
    text = ""
    while len(text.split()) < words:
        text += base
    return text + f"Summarise the life of {topic} in a few sentences."


async def one(client, model, i, args, extra):
    t0 = time.perf_counter()
    first = None
    tokens = None
    prompt_tokens = None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages_for(i, args),
            max_tokens=args.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra)
        async for c in stream:
            if c.choices and c.choices[0].delta.content and first is None:
                first = time.perf_counter() - t0
            if c.usage:
                tokens = c.usage.completion_tokens
                prompt_tokens = c.usage.prompt_tokens
        return {"ok": True, "ttft": first, "latency": time.perf_counter() - t0, "tokens": tokens,
                "prompt_tokens": prompt_tokens}
    except openai.APIStatusError as e:
        return {"ok": False, "status": e.status_code, "latency": time.perf_counter() - t0,
                "retry_after": e.response.headers.get("retry-after")}
    except Exception as e:  # noqa: BLE001 - any other failure is reported as such
        return {"ok": False, "status": None, "error": repr(e), "latency": time.perf_counter() - t0}


async def sampler(pid, base, done, acc):
    while not done.is_set():
        acc["rss_peak_kib"] = max(acc["rss_peak_kib"], rss_kib(pid))
        try:
            m = await asyncio.to_thread(metrics, base)
            for k in ("kvmerger_running_requests", "kvmerger_queue_depth",
                      "kvmerger_kv_bytes_in_use", "kvmerger_kv_bytes_saved"):
                acc["max_" + k] = max(acc.get("max_" + k, 0), m.get(k, 0))
        except Exception:  # noqa: BLE001 - a missed sample is not a failure
            pass
        try:
            await asyncio.wait_for(done.wait(), 0.1)
        except asyncio.TimeoutError:
            pass


def pct(xs, p):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/kvmerger")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=150)
    ap.add_argument("--warmup-words", type=int, default=None,
                    help="words of the warm-up request's prompt (default: --prompt-words); "
                         "a short one saves a long prefill when prompts are long")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--documents", type=int, default=0,
                    help="clients ask about this many shared documents (system message), "
                         "request i about document i %% N; 0: every prompt its own")
    ap.add_argument("--kv-memory", default="1GiB")
    ap.add_argument("--kv-compression", default=None,
                    help='per-request kv_compression JSON, e.g. \'{"method": "kvmerger", "budget": 0.5}\'')
    ap.add_argument("--server-arg", action="append", default=[], help="extra flag for kvmerger serve")
    ap.add_argument("--deadline", type=float, default=900, help="overall limit in seconds")
    ap.add_argument("--rss-slack-mib", type=float, default=16)
    args = ap.parse_args()

    cmd = [args.bin, "serve", "--port", "0", "-m", args.model, "--kv-memory", args.kv_memory,
           "--max-queue", str(max(64, args.requests))] + args.server_arg
    server, host, port = start(cmd)
    try:
        base = f"http://{host}:{port}"
        client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                             timeout=max(600, args.deadline))
        extra = {"ignore_eos": True}
        if args.kv_compression:
            extra["kv_compression"] = json.loads(args.kv_compression)

        # Warm up (weights paged in, allocator pools created), then settle.
        warm = argparse.Namespace(**vars(args))
        if args.warmup_words is not None:
            warm.prompt_words = args.warmup_words
        warm_result = await one(client, args.model, 999, warm, extra)
        if not warm_result["ok"]:
            sys.exit(f"the warm-up request failed: {warm_result}")
        await asyncio.sleep(2)
        rss_idle = rss_kib(server.pid)

        acc = {"rss_peak_kib": rss_idle}
        sampling_done = asyncio.Event()
        samp = asyncio.create_task(sampler(server.pid, base, sampling_done, acc))
        t_start = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(one(client, args.model, i, args, extra) for i in range(args.requests))),
            args.deadline)
        wall = time.perf_counter() - t_start
        sampling_done.set()
        await samp

        # Memory after: give the engine a moment to free the last caches. Contexts it
        # keeps for reuse (kvmerger_context_cache_bytes) stay, within --kv-memory.
        def rss_limit():
            kept = metrics(base).get("kvmerger_context_cache_bytes", 0) / 1024
            return rss_idle + kept + args.rss_slack_mib * 1024
        rss_after = rss_kib(server.pid)
        for _ in range(50):
            if rss_after <= rss_limit():
                break
            await asyncio.sleep(0.1)
            rss_after = rss_kib(server.pid)
        m = metrics(base)

        ok = [r for r in results if r["ok"]]
        refused = [r for r in results if not r["ok"] and r.get("status") in (429, 503)]
        failed = [r for r in results if not r["ok"] and r.get("status") not in (429, 503)]
        tokens = sum(r["tokens"] or 0 for r in ok)
        saved_total = sum(v for k, v in m.items() if k.startswith("kvmerger_kv_bytes_saved_total"))
        summary = {
            "command": " ".join(cmd),
            "requests": args.requests, "prompt_words": args.prompt_words,
            "prompt_tokens_first": results[0].get("prompt_tokens") if results else None,
            "max_tokens": args.max_tokens, "kv_compression": extra.get("kv_compression"),
            "ok": len(ok), "refused_503_429": len(refused), "failed": len(failed),
            "failures": failed[:5],
            "wall_s": round(wall, 2),
            "generated_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_s": {"p50": pct([r["ttft"] for r in ok], 50), "p90": pct([r["ttft"] for r in ok], 90),
                       "max": pct([r["ttft"] for r in ok], 100)},
            "latency_s": {"p50": pct([r["latency"] for r in ok], 50),
                          "p90": pct([r["latency"] for r in ok], 90),
                          "max": pct([r["latency"] for r in ok], 100)},
            "rss_mib": {"idle": round(rss_idle / 1024, 1), "peak": round(acc["rss_peak_kib"] / 1024, 1),
                        "after": round(rss_after / 1024, 1)},
            "max_running": acc.get("max_kvmerger_running_requests"),
            "max_queue_depth": acc.get("max_kvmerger_queue_depth"),
            "kv_in_use_peak_mib": round(m.get("kvmerger_kv_bytes_peak", 0) / 2**20, 2),
            "kv_saved_while_running_max_mib": round(acc.get("max_kvmerger_kv_bytes_saved", 0) / 2**20, 2),
            "kv_saved_total_mib": round(saved_total / 2**20, 2),
            "compression_ratio": {k.split('"')[1]: v for k, v in m.items()
                                  if k.startswith("kvmerger_compression_ratio")},
            "mean_batch": round(m.get("kvmerger_engine_step_sequences_total", 0)
                                / max(1, m.get("kvmerger_engine_steps_total", 1)), 2),
            "documents": args.documents,
            "context_cache": {"hits": m.get("kvmerger_context_cache_hits_total"),
                              "misses": m.get("kvmerger_context_cache_misses_total"),
                              "reused_tokens": m.get("kvmerger_context_cache_reused_tokens_total"),
                              "evictions": m.get("kvmerger_context_cache_evictions_total"),
                              "mib_after": round(m.get("kvmerger_context_cache_bytes", 0) / 2**20, 2)},
            "prompt_tokens_prefilled": m.get("kvmerger_prompt_tokens_total"),
            "load_average": os.getloadavg(),
        }
        checks = {
            "no failures but 503/429": not failed,
            "rss back to idle (plus contexts kept for reuse)": rss_after <= rss_limit(),
            "kv caches freed": m.get("kvmerger_kv_bytes_in_use", 1) == 0,
        }
        if args.kv_compression and json.loads(args.kv_compression) not in ("none", False):
            checks["metrics show KV saved"] = saved_total > 0
        summary["checks"] = checks
        print(json.dumps(summary, indent=2))
    finally:
        code = stop(server)
    conclude(code, checks)


if __name__ == "__main__":
    asyncio.run(main())
