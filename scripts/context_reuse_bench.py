#!/usr/bin/env python3
"""Context reuse in `kvmerger serve`, measured from a second process on loopback.

1. Ten different questions about one document (about 4k tokens), one after another,
   each a chat with the document as its system message and the question as the user
   message, compressed under the query-agnostic protocol: time to first token of the
   first question (prefill, compression) and of the later ones (reused compressed
   document, only the question prefilled), and the memory the server holds.
2. A 20-turn chat over the same document: time to first token per turn.
3. The same ten questions against a server started with --no-context-reuse: the
   greedy answers must be the same.

Prints a JSON summary; exits non-zero when an answer differs or a check fails.

  python3 scripts/context_reuse_bench.py --model qwen2.5-0.5b \\
      --kv-compression '{"method": "kvmerger+", "budget": 0.5, "protocol": "agnostic"}'
"""

import argparse
import json
import os
import sys
import time
import urllib.request

from serve_process import conclude, rss_kib, start, stop

try:
    from openai import OpenAI
except ImportError as e:
    sys.exit(f"the openai package is missing ({e}): "
             "python3 -m pip install -r scripts/requirements-reference.txt")

COLOURS = ["red", "blue", "green", "white", "black", "yellow", "grey", "brown"]
STREETS = ["Mill Lane", "River Road", "Church Street", "Station Road", "Bridge Street"]


def document(facts):
    return "".join(
        f"Record {i}: the {COLOURS[i % 8]} door of house {i * 3 + 1} on {STREETS[i % 5]} "
        f"opens with code {1000 + (i * 7919) % 9000}, and its owner keeps {i % 9 + 2} hens.\n"
        for i in range(facts))


def questions(n, facts):
    out = []
    for k in range(n):
        i = (k * 37 + 11) % facts
        if k % 2 == 0:
            out.append(f"Which code opens the door of house {i * 3 + 1} on {STREETS[i % 5]}?")
        else:
            out.append(f"How many hens does the owner of house {i * 3 + 1} keep?")
    return out


def metrics(base):
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line and not line.startswith("#"))}


def ask(client, model, messages, max_tokens, extra):
    """Streams one chat; returns (answer, time to first token, usage)."""
    t0 = time.perf_counter()
    first, parts, usage = None, [], None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra)
    for c in stream:
        if c.choices and c.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t0
            parts.append(c.choices[0].delta.content)
        if c.usage:
            usage = c.usage
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return "".join(parts), first, {"prompt_tokens": usage.prompt_tokens, "cached_tokens": cached}


def serve(args, reuse):
    cmd = [args.bin, "serve", "--port", "0", "-m", args.model, "--kv-memory", args.kv_memory]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    if not reuse:
        cmd.append("--no-context-reuse")
    server, host, port = start(cmd)
    base = f"http://{host}:{port}"
    return server, base, OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                                timeout=1800), cmd


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/kvmerger")
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--facts", type=int, default=110, help="document records (~36 tokens each)")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--fresh", type=int, default=10,
                    help="questions also asked of a server without reuse, to compare answers")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-memory", default="1GiB")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-compression",
                    default='{"method": "kvmerger+", "budget": 0.5, "protocol": "agnostic"}')
    args = ap.parse_args()
    extra = {"kv_compression": json.loads(args.kv_compression)}
    doc = document(args.facts)
    qs = questions(args.questions, args.facts)
    system = {"role": "system", "content": "Answer from these records.\n" + doc}
    out = {"kv_compression": extra["kv_compression"], "model": args.model,
           "load_average_before": os.getloadavg()}

    server, base, client, cmd = serve(args, True)
    try:
        out["command"] = " ".join(cmd)
        # Warm up on another text (weights paged in), then measure.
        ask(client, args.model, [{"role": "system", "content": "Say hi."},
                                 {"role": "user", "content": "Hi"}], 2, extra)
        rss_idle = rss_kib(server.pid)
        rows = []
        for q in qs:
            a, ttft, u = ask(client, args.model, [system, {"role": "user", "content": q}],
                             args.max_tokens, extra)
            rows.append({"question": q, "answer": a, "ttft_s": round(ttft, 3), **u})
        m = metrics(base)
        out["questions"] = rows
        later = [r["ttft_s"] for r in rows[1:]]
        out["ttft_first_s"] = rows[0]["ttft_s"]
        out["ttft_later_mean_s"] = round(sum(later) / max(1, len(later)), 3)
        out["ttft_later_max_s"] = max(later) if later else None
        out["later_over_first"] = round(max(later) / rows[0]["ttft_s"], 4) if later else None
        out["memory"] = {
            "rss_idle_mib": round(rss_idle / 1024, 1),
            "rss_after_questions_mib": round(rss_kib(server.pid) / 1024, 1),
            "context_cache_entries": m.get("kvmerger_context_cache_entries"),
            "context_cache_mib": round(m.get("kvmerger_context_cache_bytes", 0) / 2**20, 2),
        }

        # A conversation over the document: each turn adds a question and its answer.
        messages = [system]
        turns = []
        for t in range(args.turns):
            q = qs[t % len(qs)] if t < len(qs) else f"And the record after that one? ({t})"
            messages.append({"role": "user", "content": q})
            a, ttft, u = ask(client, args.model, messages, args.max_tokens, extra)
            messages.append({"role": "assistant", "content": a})
            turns.append({"turn": t + 1, "ttft_s": round(ttft, 3), **u})
        out["chat"] = turns
        m = metrics(base)
        out["memory"]["context_cache_mib_after_chat"] = round(
            m.get("kvmerger_context_cache_bytes", 0) / 2**20, 2)
        out["memory"]["rss_after_chat_mib"] = round(rss_kib(server.pid) / 1024, 1)
    finally:
        code = stop(server)
    checks = {"server stopped cleanly": code == 0}

    if args.fresh:
        server, base, client, _ = serve(args, False)
        try:
            same = []
            for r in out["questions"][:args.fresh]:
                a, ttft, u = ask(client, args.model,
                                 [system, {"role": "user", "content": r["question"]}],
                                 args.max_tokens, extra)
                same.append(a == r["answer"])
                r["fresh_answer"], r["fresh_ttft_s"] = a, round(ttft, 3)
            out["same_answers"] = f"{sum(same)} of {len(same)}"
            checks["same answers as a fresh run"] = all(same)
        finally:
            code = stop(server)
        checks["fresh server stopped cleanly"] = code == 0
    out["load_average_after"] = os.getloadavg()
    out["checks"] = checks
    print(json.dumps(out, indent=2))
    conclude(0, checks)


if __name__ == "__main__":
    main()
