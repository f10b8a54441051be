#!/usr/bin/env python3
"""Soak test of `kvmerger serve`: mixed requests for a fixed time, on loopback only.

Starts the server (port 0, loopback) and keeps WORKERS clients busy for DURATION
seconds with a mix of requests: streamed and plain chat and completions, with and
without compression (several methods), clients that disconnect in the middle of a
stream, and bad requests (malformed JSON, unknown methods, bad sampling values, a
prompt longer than the context). Resident memory is sampled every second.

Checks, printed as JSON (exit status 1 when one fails):
- every response is one of the documented statuses: 200, 400 for the bad requests,
  429/503 when the queue is full, 504 on the request timeout; no 500, no dropped
  connection on a request that was not abandoned on purpose;
- resident memory is flat after warm-up: its median over the last quarter of the
  run, and its level once the load stops, are within 5% of its median over the
  quarter that follows the warm-up (the first WARMUP seconds);
- the server exits cleanly on SIGTERM.

Standard library only. Bounded: every request has a timeout, the run a deadline.

  python3 scripts/soak_test.py --duration 600 --workers 8
"""

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
import urllib.request

from serve_process import conclude, rss_kib, start, stop


async def http(host, port, method, path, body=None, raw=None, abandon_after=None, timeout=120):
    """One request on its own connection. Returns (status, bytes read); status None when
    the connection failed; 'abandoned' when we closed it on purpose mid-stream."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
        writer.write(head + data)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout)
        m = re.match(rb"HTTP/1\.1 (\d+)", status_line)
        if not m:
            return None, 0
        status = int(m.group(1))
        got = 0
        while True:
            chunk = await asyncio.wait_for(reader.read(4096), timeout)
            if not chunk:
                break
            got += len(chunk)
            if abandon_after is not None and got >= abandon_after and status == 200:
                return "abandoned", got
        return status, got
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except Exception:  # noqa: BLE001 - a reset on close is fine here
            pass


WORDS = ("river mill ledger grain bridge lantern harbour orchard meadow quarry "
         "cellar attic chapel market tower garden").split()


def text(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words))


METHODS = [None, {"method": "kvmerger", "budget": 0.5}, {"method": "snapkv", "budget": 0.5, "options": {"window": 8}},
           {"method": "streaming", "budget": 0.35}, {"method": "kvzip", "budget": 0.5},
           {"method": "h2o", "budget": 0.5, "recompress_margin": 16}]


def request_for(rng, model):
    """(kind, method, path, body or raw, expected statuses, abandon_after)"""
    kind = rng.choices(["chat_stream", "chat", "completion", "completion_stream", "disconnect", "bad"],
                       weights=[3, 2, 2, 2, 1, 2])[0]
    kv = rng.choice(METHODS)
    extra = {"kv_compression": kv} if kv else {}
    ok = {200, 429, 503, 504}
    words = rng.randint(20, 400)
    if kind.startswith("chat"):
        body = {"model": model, "messages": [{"role": "user", "content": text(rng, words)}],
                "max_tokens": rng.randint(1, 24), "stream": kind == "chat_stream", **extra}
        return kind, "/v1/chat/completions", body, None, ok, None
    if kind.startswith("completion"):
        body = {"model": model, "prompt": text(rng, words), "max_tokens": rng.randint(1, 24),
                "temperature": rng.choice([0, 0.7, 1e-30]), "stream": kind == "completion_stream", **extra}
        return kind, "/v1/completions", body, None, ok, None
    if kind == "disconnect":
        body = {"model": model, "prompt": text(rng, words), "max_tokens": 400, "stream": True,
                "ignore_eos": True, **extra}
        return kind, "/v1/completions", body, None, ok | {"abandoned"}, rng.randint(1, 2000)
    bads = [
        (None, b"{not json"),
        ({"model": model, "prompt": "x", "kv_compression": {"method": "nope"}}, None),
        ({"model": model, "prompt": "x", "temperature": -1}, None),
        ({"model": model, "prompt": text(rng, 50), "kv_compression": {"method": "snapkv", "budget": 0.5,
                                                                    "options": {"window": 100000}}}, None),
        ({"model": model, "prompt": text(rng, 12000), "max_tokens": 1}, None),
        ({"model": model, "messages": []}, None),
    ]
    which = rng.randrange(len(bads))
    bad = bads[which]
    path = "/v1/chat/completions" if bad[0] and "messages" in bad[0] else "/v1/completions"
    return f"bad#{which}", path, bad[0], bad[1], {400, 413}, None


async def worker(host, port, model, seed, until, stats):
    rng = random.Random(seed)
    while time.time() < until:
        kind, path, body, raw, expected, abandon = request_for(rng, model)
        try:
            status, _ = await http(host, port, "POST", path, body=body, raw=raw, abandon_after=abandon)
        except asyncio.TimeoutError:
            status = "timeout"
        except OSError as e:
            status = f"oserror {e.errno}"
        key = f"{kind} {status}"
        stats["counts"][key] = stats["counts"].get(key, 0) + 1
        if status not in expected:
            stats["unexpected"].append(key)


def rss_less_kept(pid, host, port):
    """Resident KiB less the contexts the server keeps for reuse: those grow by design
    (up to --kv-memory, evicted least recently used), so they are not a leak."""
    try:
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
        kept = next((float(line.split()[1]) for line in text.splitlines()
                     if line.startswith("kvmerger_context_cache_bytes ")), 0.0)
    except OSError:
        kept = 0.0
    return rss_kib(pid) - int(kept / 1024)


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/kvmerger")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--warmup", type=float, default=60)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--kv-memory", default="256MiB")
    ap.add_argument("--tolerance", type=float, default=0.05)
    args = ap.parse_args()

    cmd = [args.bin, "serve", "--port", "0", "-m", args.model, "--kv-memory", args.kv_memory,
           "--max-queue", "16", "--timeout", "60"]
    server, host, port = start(cmd)
    checks = {}
    try:
        stats = {"counts": {}, "unexpected": []}
        began = time.time()
        until = began + args.duration
        tasks = [asyncio.create_task(worker(host, port, args.model, 1000 + i, until, stats))
                 for i in range(args.workers)]
        samples = []
        while time.time() < until:
            samples.append((time.time() - began, rss_less_kept(server.pid, host, port)))
            await asyncio.sleep(1)
        await asyncio.wait_for(asyncio.gather(*tasks), 300)
        await asyncio.sleep(3)
        rss_end = rss_less_kept(server.pid, host, port)

        # Resident memory follows the load (how many requests run at once), so levels
        # are medians over a window: the first stretch after warm-up against the last
        # quarter of the run. A leak shows as growth between them, and as memory not
        # returned once the load stops.
        def median(xs):
            xs = sorted(xs)
            return xs[len(xs) // 2] if xs else 0
        after_warm = [r for t, r in samples if args.warmup <= t < args.warmup + 0.25 * args.duration]
        last = [r for t, r in samples if t >= 0.75 * args.duration]
        warm_level, last_level = median(after_warm), median(last)
        limit = warm_level * (1 + args.tolerance)
        last_peak = max(last) if last else rss_end
        checks = {
            "only documented statuses": not stats["unexpected"],
            "rss flat after warm-up (median of the last quarter)": last_level <= limit,
            "rss back down after the load": rss_end <= limit,
        }
        summary = {
            "command": " ".join(cmd), "duration_s": args.duration, "workers": args.workers,
            "requests": sum(stats["counts"].values()), "by_kind_and_status": dict(sorted(stats["counts"].items())),
            "unexpected": stats["unexpected"][:10],
            "rss_mib": {"start": round(samples[0][1] / 1024, 1),
                        "median_after_warmup": round(warm_level / 1024, 1),
                        "median_last_quarter": round(last_level / 1024, 1),
                        "peak_last_quarter": round(last_peak / 1024, 1), "after_load": round(rss_end / 1024, 1),
                        "peak": round(max(r for _, r in samples) / 1024, 1)},
            "load_average": os.getloadavg(),
            "checks": checks,
        }
        print(json.dumps(summary, indent=2))
    finally:
        code = stop(server)
    conclude(code, checks)


if __name__ == "__main__":
    asyncio.run(main())
