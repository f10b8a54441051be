"""Drives a running kvmerger server with the official `openai` Python package.

Usage: python3 openai_client.py BASE_URL MODEL API_KEY
Prints one JSON object of observations; tests/openai_client.rs asserts on it.
Exits 2 with a message when the package is missing.
"""

import json
import sys

try:
    import openai
    from openai import OpenAI
except ImportError as e:  # the Rust test turns this into a clear failure
    print(f"the openai package is not installed ({e}); run: "
          "python3 -m pip install -r scripts/requirements-reference.txt", file=sys.stderr)
    sys.exit(2)

base_url, model, api_key = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
out = {"openai_version": openai.__version__}

KV = {"kv_compression": {"method": "kvmerger", "budget": 0.5}}
STORY = ("Mara keeps a lighthouse on a rock far out at sea. Every evening she climbs "
         "the ninety steps, trims the wick, and writes the weather in a blue logbook. "
         "One winter a storm broke the lamp, and fishermen rowed out to help her. ") * 4


def kv(usage):
    extra = usage.model_extra or {}
    return extra.get("kv_cache")


# Models.
out["models"] = [m.id for m in client.models.list().data]

# Completions, not streamed, with and without compression.
for name, extra in [("completion", {}), ("completion_kv", KV)]:
    r = client.completions.create(model=model, prompt=STORY + "Every evening, Mara writes the weather in a",
                                  max_tokens=12, temperature=0, extra_body=extra)
    out[name] = {
        "text": r.choices[0].text,
        "finish_reason": r.choices[0].finish_reason,
        "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens,
        "kv_cache": kv(r.usage),
        "object": r.object,
    }

# Completions, streamed, with and without compression.
for name, extra in [("completion_stream", {}), ("completion_stream_kv", KV)]:
    stream = client.completions.create(model=model, prompt=STORY + "Every evening, Mara writes the weather in a",
                                       max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=extra)
    text, finish, usage, chunks = "", None, None, 0
    for c in stream:
        chunks += 1
        if c.choices:
            text += c.choices[0].text
            finish = c.choices[0].finish_reason or finish
        if c.usage:
            usage = c.usage
    out[name] = {"text": text, "finish_reason": finish, "chunks": chunks,
                 "completion_tokens": usage.completion_tokens if usage else None,
                 "kv_cache": kv(usage) if usage else None}

MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": STORY + "Where does Mara write the weather?"}]

# Chat, not streamed, with and without compression.
for name, extra in [("chat", {}), ("chat_kv", KV)]:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24,
                                       temperature=0, extra_body=extra)
    out[name] = {
        "content": r.choices[0].message.content,
        "role": r.choices[0].message.role,
        "finish_reason": r.choices[0].finish_reason,
        "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens,
        "kv_cache": kv(r.usage),
        "object": r.object,
    }

# Chat, streamed, with and without compression.
for name, extra in [("chat_stream", {}), ("chat_stream_kv", KV)]:
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body=extra)
    content, roles, finish, usage, chunks = "", [], None, None, 0
    for c in stream:
        chunks += 1
        if c.choices:
            d = c.choices[0].delta
            if d.role:
                roles.append(d.role)
            content += d.content or ""
            finish = c.choices[0].finish_reason or finish
        if c.usage:
            usage = c.usage
    out[name] = {"content": content, "roles": roles, "finish_reason": finish, "chunks": chunks,
                 "completion_tokens": usage.completion_tokens if usage else None,
                 "kv_cache": kv(usage) if usage else None}

# A document asked two questions, then a second turn: the compressed document is reused
# (usage.prompt_tokens_details.cached_tokens), and so is the first turn.
doc = "".join(f"Fact {i}: the {['red', 'blue', 'green'][i % 3]} door of house {i * 3 + 1} "
              f"opens with code {1000 + i * 37}.\n" for i in range(30))
agnostic = {"kv_compression": {"method": "keydiff", "budget": 0.5, "protocol": "agnostic"}}
def turn(messages):
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                       temperature=0, extra_body=agnostic)
    d = r.usage.prompt_tokens_details
    return {"content": r.choices[0].message.content, "prompt_tokens": r.usage.prompt_tokens,
            "cached_tokens": d.cached_tokens if d else None}
system = {"role": "system", "content": "Answer from this document.\n" + doc}
q1 = {"role": "user", "content": "Which code opens the blue door of house 4?"}
q2 = {"role": "user", "content": "What colour is the door of house 10?"}
first = turn([system, q1])
second = turn([system, q2])
again = turn([system, q1])
followup = turn([system, q1, {"role": "assistant", "content": first["content"]}, q2])
out["reuse"] = {"first": first, "second": second, "again": again, "followup": followup}

# Stop strings and seeded sampling.
r = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0,
                              stop=[" 7"])
out["stop"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason}
seeded = [client.completions.create(model=model, prompt="Once upon a time", max_tokens=10,
                                    temperature=0.9, seed=11).choices[0].text for _ in range(2)]
out["seeded_equal"] = seeded[0] == seeded[1]

# Log-probabilities, as the client's types read them.
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
lp = r.choices[0].logprobs.content
out["chat_logprobs"] = {"content": r.choices[0].message.content,
                        "tokens": [t.token for t in lp],
                        "logprobs": [t.logprob for t in lp],
                        "top": [[x.logprob for x in t.top_logprobs] for t in lp]}
r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4,
                              temperature=0, logprobs=3)
lp = r.choices[0].logprobs
out["completion_logprobs"] = {"text": r.choices[0].text, "tokens": lp.tokens,
                              "token_logprobs": lp.token_logprobs,
                              "top": [len(t) for t in lp.top_logprobs],
                              "text_offset": lp.text_offset}

# Errors, as the client's exception classes.
errors = {}
def expect(name, fn):
    try:
        fn()
        errors[name] = None
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        errors[name] = {"status": e.status_code, "class": type(e).__name__,
                        "code": body.get("code"), "param": body.get("param")}

expect("unknown_model", lambda: client.chat.completions.create(
    model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2))
expect("bad_temperature", lambda: client.completions.create(
    model=model, prompt="hi", max_tokens=2, temperature=5))
expect("bad_compression", lambda: client.completions.create(
    model=model, prompt="hi", max_tokens=2, extra_body={"kv_compression": {"method": "nope", "budget": 0.5}}))
expect("too_long", lambda: client.completions.create(
    model=model, prompt=[1] * 9000, max_tokens=2))
out["errors"] = errors

try:
    OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0).models.list()
    out["wrong_key"] = None
except openai.AuthenticationError as e:
    out["wrong_key"] = e.status_code

print(json.dumps(out))
