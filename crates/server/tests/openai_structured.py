"""Structured outputs, tools, n and assistant prefill through the official `openai`
Python package, against a running kvmerger server (qwen2.5-0.5b: its chat template
has a tools section).

Usage: python3 openai_structured.py BASE_URL MODEL
Prints one JSON object of observations; tests/openai_client.rs asserts on it.
"""

import json
import sys
import time

try:
    from openai import OpenAI
except ImportError as e:
    print(f"the openai package is not installed ({e}); run: "
          "python3 -m pip install -r scripts/requirements-reference.txt", file=sys.stderr)
    sys.exit(2)

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
out = {}

# A JSON schema with a nested object and an enum.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                    "required": ["city", "country"], "additionalProperties": False},
        "job": {"type": "string", "enum": ["student", "engineer", "artist"]},
    },
    "required": ["name", "age", "address", "job"],
    "additionalProperties": False,
}
ask = [{"role": "user", "content": "Ana is 31, an engineer, and lives in Lisbon, Portugal. "
                                   "Describe her as JSON."}]
for name, stream in [("schema", False), ("schema_stream", True)]:
    t0 = time.time()
    r = client.chat.completions.create(
        model=model, messages=ask, max_tokens=80, temperature=0, stream=stream,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    if stream:
        content, finish = "", None
        for c in r:
            if c.choices:
                content += c.choices[0].delta.content or ""
                finish = c.choices[0].finish_reason or finish
    else:
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
    out[name] = {"content": content, "finish_reason": finish, "secs": time.time() - t0}
r = client.chat.completions.create(model=model, messages=ask, max_tokens=60, temperature=0,
                                   response_format={"type": "json_object"})
out["json_object"] = {"content": r.choices[0].message.content,
                      "finish_reason": r.choices[0].finish_reason}
r = client.chat.completions.create(model=model, messages=ask, max_tokens=60, temperature=0)
out["unconstrained"] = {"content": r.choices[0].message.content}

# Tools: a forced call (tool_choice required), then the tool's answer sent back.
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string"},
                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
]
q = [{"role": "user", "content": "What is the weather in Paris right now, in celsius?"}]
calls = {}
for name, extra in [("tool_required", {"tool_choice": "required"}),
                    ("tool_named", {"tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
                    ("tool_auto", {})]:
    r = client.chat.completions.create(model=model, messages=q, max_tokens=60, temperature=0,
                                       tools=TOOLS, **extra)
    m = r.choices[0].message
    calls[name] = {"finish_reason": r.choices[0].finish_reason, "content": m.content,
                   "calls": [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                             for c in (m.tool_calls or [])]}
# Streamed: the call arrives as tool_calls deltas.
stream = client.chat.completions.create(model=model, messages=q, max_tokens=60, temperature=0,
                                        tools=TOOLS, tool_choice="required", stream=True)
names, args, finish = [], "", None
for c in stream:
    if c.choices:
        for d in c.choices[0].delta.tool_calls or []:
            if d.function.name:
                names.append(d.function.name)
            args += d.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
calls["tool_stream"] = {"names": names, "arguments": args, "finish_reason": finish}
first = calls["tool_required"]["calls"][0] if calls["tool_required"]["calls"] else None
if first:
    follow = q + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": first["id"], "type": "function",
             "function": {"name": first["name"], "arguments": first["arguments"]}}]},
        {"role": "tool", "tool_call_id": first["id"], "content": "{\"temperature\": 17, \"sky\": \"cloudy\"}"},
    ]
    r = client.chat.completions.create(model=model, messages=follow, max_tokens=40, temperature=0,
                                       tools=TOOLS)
    calls["tool_result"] = {"content": r.choices[0].message.content,
                            "finish_reason": r.choices[0].finish_reason}
out["tools"] = calls

# n = 3 from one prefill: a long prompt, sampled three ways.
doc = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(150))
msgs = [{"role": "user", "content": doc + "\nWrite one sentence about the boxes."}]
one = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0.8,
                                     seed=1, extra_body={"kv_compression": {"method": "keydiff", "budget": 0.5}})
three = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0.8,
                                       seed=1, n=3,
                                       extra_body={"kv_compression": {"method": "keydiff", "budget": 0.5}})
kv = lambda u: (u.model_extra or {}).get("kv_cache") or {}
out["n"] = {
    "one": {"text": one.choices[0].message.content, "prompt_tokens": one.usage.prompt_tokens,
            "completion_tokens": one.usage.completion_tokens, "kv_cache": kv(one.usage)},
    "three": {"texts": [c.message.content for c in three.choices],
              "indexes": [c.index for c in three.choices],
              "prompt_tokens": three.usage.prompt_tokens,
              "completion_tokens": three.usage.completion_tokens,
              "kv_cache": kv(three.usage)},
}

# Assistant prefill: the final assistant message is continued, not answered anew.
prefill = [{"role": "user", "content": "List three primary colours, comma separated."},
           {"role": "assistant", "content": "Red, yellow,"}]
r = client.chat.completions.create(model=model, messages=prefill, max_tokens=8, temperature=0)
out["prefill"] = {"content": r.choices[0].message.content,
                  "prompt_tokens": r.usage.prompt_tokens}
r = client.chat.completions.create(model=model, messages=prefill, max_tokens=8, temperature=0,
                                   extra_body={"continue_final_message": False,
                                               "add_generation_prompt": True})
out["new_turn"] = {"content": r.choices[0].message.content, "prompt_tokens": r.usage.prompt_tokens}

print(json.dumps(out))
