"""Constrained decoding's cost on qwen2.5-0.5b (docs/performance.md): one server, the
same chat request with no constraint, a JSON schema, json_object and a forced tool
call, three times in turn; the server's JSON request log gives each request's decode
rate and, for constrained ones, the time spent in llguidance per token.

Usage: python3 scripts/constrained_cost.py [KVMERGER_BINARY]   (default target/release/kvmerger)
Run it on an idle machine."""
import json, subprocess, sys, time, urllib.request
PORT = 8391
BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/kvmerger"
srv = subprocess.Popen([BIN, "serve", "-m", "qwen2.5-0.5b", "--port", str(PORT),
                        "--threads", "2", "--log-format", "json"], stderr=subprocess.PIPE, text=True)
def post(body):
    r = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/chat/completions", json.dumps(body).encode(),
                               {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(r, timeout=600))
for _ in range(60):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=1); break
    except Exception:
        time.sleep(0.5)
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
          "address": {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                      "required": ["city", "country"], "additionalProperties": False},
          "job": {"type": "string", "enum": ["student", "engineer", "artist"]}},
          "required": ["name", "age", "address", "job"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
          "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
          "required": ["city", "unit"]}}}]
msgs = [{"role": "user", "content": "Ana is 31, an engineer, and lives in Lisbon, Portugal. Describe her as JSON."}]
base = {"model": "qwen2.5-0.5b", "messages": msgs, "max_tokens": 40, "temperature": 0}
kinds = {
    "none": {},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}},
    "json_object": {"response_format": {"type": "json_object"}},
    "tool_required": {"tools": TOOLS, "tool_choice": "required",
                      "messages": [{"role": "user", "content": "Weather in Paris, in celsius?"}]},
}
first = post({**base, **kinds["json_schema"]})  # builds the vocabulary trie
print("first constrained request queue_ms", first["usage"]["kv_cache"]["queue_ms"])
order = []
for rep in range(3):
    for k, extra in kinds.items():
        r = post({**base, **extra})
        order.append((k, r["usage"]["completion_tokens"]))
srv.terminate(); _, err = srv.communicate(timeout=60)
lines = [json.loads(l) for l in err.splitlines() if l.startswith("{")]
reqs = [l for l in lines if l.get("event") == "request"][1:]
for (k, n), l in zip(order, reqs):
    print(k, "tokens", n, "tokens_per_s", l.get("tokens_per_s"), "mask_us_per_token", l.get("mask_us_per_token"))
