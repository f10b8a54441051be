#!/usr/bin/env python3
"""How long a restarted server takes to read a compressed context from its store.

Starts `kvmerger serve --context-store STORE`, asks one question about a document
(~3,500 tokens, compressed under the query-agnostic protocol), stops the server,
starts it again and asks another question about the same document: that request
reads the context from the store. Prints both requests' times and the server's own
counter of store reads (`kvmerger_context_store_read_microseconds_total`: the read
and the decode with its checksum). STORE is a directory or redis://HOST:PORT/ (start
the Redis yourself).

  python3 scripts/store_read.py --model qwen2.5-0.5b --store /tmp/kvmerger-store
  python3 scripts/store_read.py --model qwen2.5-0.5b --store redis://127.0.0.1:6379/
"""

import argparse
import json
import os
import time

from context_reuse_bench import document, metrics
from openai import OpenAI
from serve_process import start, stop


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/kvmerger")
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--store", required=True)
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--kv-compression",
                    default='{"method": "kvmerger+", "budget": 0.25, "protocol": "agnostic"}')
    args = ap.parse_args()
    system = {"role": "system", "content": "Answer from these records.\n" + document(args.facts)}
    extra = {"kv_compression": json.loads(args.kv_compression)}
    cmd = [args.bin, "serve", "--port", "0", "-m", args.model, "--context-store", args.store]
    out = {"command": " ".join(cmd), "load_average_before": os.getloadavg()}
    for label, q in (("computed", "Which code opens the door of house 34 on River Road?"),
                     ("after_restart", "How many hens does the owner of house 145 keep?")):
        proc, host, port = start(cmd)
        try:
            client = OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused",
                            max_retries=0, timeout=3600)
            t = time.perf_counter()
            r = client.chat.completions.create(
                model=args.model, messages=[system, {"role": "user", "content": q}],
                max_tokens=4, temperature=0, extra_body=extra)
            m = metrics(f"http://{host}:{port}")
            hits = m.get("kvmerger_context_store_hits_total", 0)
            out[label] = {
                "seconds": round(time.perf_counter() - t, 4),
                "cached_tokens": r.usage.prompt_tokens_details.cached_tokens,
                "store_hits": hits,
                "store_read_ms": round(m.get("kvmerger_context_store_read_microseconds_total", 0)
                                       / max(hits, 1) / 1e3, 2),
            }
            if label == "computed":
                time.sleep(3)  # the store's writer thread finishes
        finally:
            stop(proc)
    out["load_average_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
