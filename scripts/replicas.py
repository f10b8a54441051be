#!/usr/bin/env python3
"""Two `kvmerger serve` replicas sharing one Redis context store behind a round-robin
proxy, measured from outside on loopback.

1. Starts a Redis (Debian's redis-server) on a free loopback port, two replicas with
   `--context-store redis://...`, and a round-robin proxy in front of them (nginx when
   it is installed, else a small proxy in this script that alternates the same way).
2. Asks ten questions about one document (about 3,700 tokens), each a chat with the
   document as its system message, compressed under the query-agnostic protocol, one
   after another through the proxy: the first is computed (prefill, compression and any
   pass), every later one, on either replica, finds the compressed document.
3. Restarts replica 1 and asks the ten questions again.
4. Asks the same questions of a server with no store and no reuse: the answers must be
   the same.

Prints a JSON summary (time to first token, cached tokens, which replica answered, store
sizes, load average before and after); exits non-zero when a check fails.

  python3 scripts/replicas.py --model qwen2.5-0.5b \\
      --kv-compression '{"method": "kvmerger+", "budget": 0.25, "protocol": "agnostic"}'
"""

import argparse
import http.client
import http.server
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from context_reuse_bench import document, metrics, questions
from serve_process import start, stop

try:
    from openai import OpenAI
except ImportError as e:
    sys.exit(f"the openai package is missing ({e}): "
             "python3 -m pip install -r scripts/requirements-reference.txt")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, secs=20):
    t0 = time.time()
    while time.time() - t0 < secs:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def start_redis(workdir):
    port = free_port()
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", workdir],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_port(port):
        p.kill()
        sys.exit("redis-server did not start (apt-get install redis-server)")
    return p, port


def redis_used_bytes(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "memory"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    return None


def redis_entries(port):
    keys = subprocess.run(["redis-cli", "-p", str(port), "--scan", "--pattern",
                           "kvmerger:ctx:*"], capture_output=True, text=True).stdout.split()
    sizes = []
    for k in keys:
        n = subprocess.run(["redis-cli", "-p", str(port), "strlen", k],
                           capture_output=True, text=True).stdout.strip()
        sizes.append(int(n or 0))
    return sizes


def start_nginx(workdir, port, upstreams):
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
daemon off; pid {workdir}/nginx.pid; error_log {workdir}/nginx.err;
events {{}}
http {{
  access_log off; client_body_temp_path {workdir}; proxy_temp_path {workdir};
  upstream replicas {{ {" ".join(f"server 127.0.0.1:{u};" for u in upstreams)} }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://replicas; proxy_buffering off;
                 proxy_read_timeout 3600s; proxy_http_version 1.1;
                 add_header X-Upstream $upstream_addr; }}
  }}
}}
""")
    p = subprocess.Popen(["nginx", "-c", conf], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    if not wait_port(port):
        p.kill()
        return None
    return p


class RoundRobin(http.server.ThreadingHTTPServer):
    """The proxy used without nginx: each request goes to the next replica in turn;
    the replica's port is returned in X-Upstream, as the nginx configuration does."""

    def __init__(self, port, upstreams):
        self.turn = itertools.cycle(upstreams)
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), Forward)


class Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.forward()

    def do_POST(self):
        self.forward()

    def forward(self):
        with self.server.lock:
            up = next(self.server.turn)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        c = http.client.HTTPConnection("127.0.0.1", up, timeout=3600)
        c.request(self.command, self.path, body,
                  {k: v for k, v in self.headers.items() if k.lower() != "host"})
        r = c.getresponse()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("X-Upstream", f"127.0.0.1:{up}")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while True:
            chunk = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
            if not chunk:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        c.close()


def ask(client, model, messages, max_tokens, extra):
    """Streams one chat; returns (answer, time to first token, usage, replica)."""
    t0 = time.perf_counter()
    first, parts, usage = None, [], None
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra)
    upstream = raw.headers.get("x-upstream", "?")
    for c in raw.parse():
        if c.choices and c.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t0
            parts.append(c.choices[0].delta.content)
        if c.usage:
            usage = c.usage
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    kv = (getattr(usage, "model_extra", None) or {}).get("kv_cache") or {}
    return "".join(parts), first, {"prompt_tokens": usage.prompt_tokens,
                                   "cached_tokens": cached,
                                   "kv_bytes": kv.get("kv_bytes")}, upstream


def replica(args, store):
    cmd = [args.bin, "serve", "--port", "0", "-m", args.model, "--kv-memory", args.kv_memory,
           "--context-store", store]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    server, host, port = start(cmd)
    return server, port, cmd


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/kvmerger")
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--facts", type=int, default=100, help="document records (~37 tokens each)")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--kv-memory", default="1GiB")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--proxy", choices=["auto", "nginx", "python"], default="auto")
    ap.add_argument("--store", choices=["redis", "disk"], default="redis",
                    help="the shared store: a Redis server, or one directory both replicas name")
    ap.add_argument("--fresh", type=int, default=3,
                    help="questions also asked of a server that computes everything, to compare answers")
    ap.add_argument("--kv-compression",
                    default='{"method": "kvmerger+", "budget": 0.25, "protocol": "agnostic"}')
    args = ap.parse_args()
    extra = {"kv_compression": json.loads(args.kv_compression)}
    doc = document(args.facts)
    qs = questions(args.questions, args.facts)
    system = {"role": "system", "content": "Answer from these records.\n" + doc}
    out = {"kv_compression": extra["kv_compression"], "model": args.model,
           "load_average_before": os.getloadavg()}
    work = tempfile.mkdtemp(prefix="kvmerger-replicas-")
    procs = {}
    checks = {}
    try:
        procs["redis"], rport = start_redis(work)
        store = f"redis://127.0.0.1:{rport}/" if args.store == "redis" else os.path.join(work, "store")
        procs["r1"], p1, cmd = replica(args, store)
        procs["r2"], p2, _ = replica(args, store)
        out["replica_command"] = " ".join(cmd)
        pport = free_port()
        use_nginx = args.proxy == "nginx" or (args.proxy == "auto" and shutil.which("nginx"))
        proxy = None
        if use_nginx:
            procs["nginx"] = start_nginx(work, pport, [p1, p2])
            out["proxy"] = "nginx round robin"
        if not use_nginx or procs.get("nginx") is None:
            proxy = RoundRobin(pport, [p1, p2])
            threading.Thread(target=proxy.serve_forever, daemon=True).start()
            out["proxy"] = "round robin (scripts/replicas.py)"
        base = f"http://127.0.0.1:{pport}"
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=3600)
        # Weights paged in on both replicas before anything is timed.
        for _ in range(2):
            ask(client, args.model, [{"role": "system", "content": "Say hi."},
                                     {"role": "user", "content": "Hi"}], 2, {})

        def round_of(label):
            rows = []
            for q in qs:
                a, ttft, u, up = ask(client, args.model, [system, {"role": "user", "content": q}],
                                     args.max_tokens, extra)
                rows.append({"question": q, "answer": a, "ttft_s": round(ttft, 4),
                             "replica": up, **u})
            out[label] = rows
            return rows

        first = round_of("round_1")
        # Replica 1 restarts: its memory is gone, the store is not.
        stop(procs["r1"])
        procs["r1"], p1b, _ = replica(args, store)
        if proxy is not None:
            proxy.turn = itertools.cycle([p1b, p2])
        else:
            stop(procs["nginx"])
            procs["nginx"] = start_nginx(work, pport, [p1b, p2])
        ask(client, args.model, [{"role": "system", "content": "Say hi."},
                                 {"role": "user", "content": "Hi"}], 2, {})
        second = round_of("round_2_after_restart")
        if args.store == "redis":
            sizes = redis_entries(rport)
            out["store"] = {"kind": "redis", "entries": len(sizes), "entry_bytes": sizes,
                            "redis_used_memory_bytes": redis_used_bytes(rport)}
        else:
            files = [os.path.join(store, f) for f in os.listdir(store) if f.endswith(".kvc")]
            out["store"] = {"kind": "disk", "entries": len(files),
                            "entry_bytes": [os.path.getsize(f) for f in files]}
        reads = []
        for port in (p1b, p2):
            m = metrics(f"http://127.0.0.1:{port}")
            out.setdefault("replica_metrics", []).append(
                {k: v for k, v in m.items() if "context_store" in k or "context_cache_hits" in k})
            hits = m.get("kvmerger_context_store_hits_total", 0)
            if hits:
                reads.append(m.get("kvmerger_context_store_read_microseconds_total", 0) / hits / 1e3)
        out["store_read_ms_mean_per_replica"] = [round(r, 2) for r in reads]
        compute = first[0]["ttft_s"]
        later = [r["ttft_s"] for r in first[1:] + second]
        out["ttft_computed_s"] = compute
        out["ttft_from_store_or_memory_max_s"] = max(later)
        out["ttft_later_over_computed"] = round(max(later) / compute, 4)
        stored_hits = [r for r in second if r["cached_tokens"] > 0]
        checks["every later question reused the document"] = all(
            r["cached_tokens"] > 0 for r in first[1:] + second)
        checks["the restarted replica answered from the store"] = any(
            r["replica"].endswith(f":{p1b}") for r in stored_hits)
        checks["answers identical across replicas and rounds"] = all(
            a["answer"] == b["answer"] for a, b in zip(first, second))
        stop(procs.pop("r1"))
        stop(procs.pop("r2"))
        # A server that computes everything itself gives the same answers.
        cmd = [args.bin, "serve", "--port", "0", "-m", args.model, "--kv-memory",
               args.kv_memory, "--no-context-reuse"]
        if args.threads:
            cmd += ["-t", str(args.threads)]
        procs["fresh"], host, fport = start(cmd)
        fresh = OpenAI(base_url=f"http://{host}:{fport}/v1", api_key="unused", max_retries=0,
                       timeout=3600)
        same = []
        for r in first[:args.fresh]:
            a, _, _, _ = ask(fresh, args.model, [system, {"role": "user", "content": r["question"]}],
                             args.max_tokens, extra)
            same.append(a == r["answer"])
        out["same_answers_as_a_fresh_server"] = f"{sum(same)} of {len(same)}"
        checks["same answers as a server that computes everything"] = all(same)
    finally:
        for name, p in procs.items():
            if p is None:
                continue
            if name in ("redis", "nginx"):
                p.terminate()
                p.wait(30)
            else:
                stop(p)
        shutil.rmtree(work, ignore_errors=True)
    out["load_average_after"] = os.getloadavg()
    out["checks"] = checks
    print(json.dumps(out, indent=2))
    if not all(checks.values()):
        sys.exit(f"checks failed: {[k for k, v in checks.items() if not v]}")


if __name__ == "__main__":
    main()
