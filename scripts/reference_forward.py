#!/usr/bin/env python3
"""Independent fp32 reference forward pass for kvmerger's logit tests.

kvmerger's Rust test-suite checks the engine's logits against this script. It
shares no code with the engine. It reads a GGUF file with the `gguf` package,
dequantizes the weights to float32 with `gguf.quants.dequantize`, and runs a
plain numpy forward pass (causal attention, no quantized arithmetic).

Supported architectures: llama (e.g. SmolLM2), qwen2, qwen3, gemma3, phi3 (fused
attn_qkv and gate/up in ffn_up; LongRoPE factors rope_factors_long/short.weight).

Usage:
    python3 scripts/reference_forward.py MODEL.gguf (--ids 1,2,3 | --ids-file F)
        [--bos] [--out logits.f32] [--last-only] [--top 5] [--greedy N]

  --ids / --ids-file  token ids (the file holds ids separated by whitespace or commas)
  --bos               put tokenizer.ggml.bos_token_id in front of the ids
  --out PATH          write logits as raw little-endian float32, row-major,
                      n_tokens x vocab (1 x vocab with --last-only). The script
                      writes a temporary file and then renames it.
  --last-only         compute and write logits for the last position only
  --top K             print the top-K tokens at the last position (default 5)
  --greedy N          also print the greedy continuation of N tokens (uses a KV cache)

Requirements: numpy, gguf (see scripts/requirements-reference.txt).
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import gguf
from gguf.quants import dequantize


# ----------------------------------------------------------------------------
# GGUF access
# ----------------------------------------------------------------------------

class Model:
    def __init__(self, path):
        self.reader = gguf.GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.meta("general.architecture")
        if self.arch not in ("llama", "qwen2", "qwen3", "gemma3", "phi3"):
            raise SystemExit(f"unsupported architecture: {self.arch}")
        a = self.arch
        self.n_layer = int(self.meta(f"{a}.block_count"))
        self.n_embd = int(self.meta(f"{a}.embedding_length"))
        self.n_head = int(self.meta(f"{a}.attention.head_count"))
        self.n_head_kv = int(self.meta(f"{a}.attention.head_count_kv", self.n_head))
        self.eps = float(self.meta(f"{a}.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(self.meta(f"{a}.rope.freq_base", 10000.0))
        self.head_dim = int(self.meta(f"{a}.attention.key_length", self.n_embd // self.n_head))
        self.head_dim_v = int(self.meta(f"{a}.attention.value_length", self.head_dim))
        self.rope_dim = int(self.meta(f"{a}.rope.dimension_count", self.head_dim))
        self.n_ff = int(self.meta(f"{a}.feed_forward_length"))
        self.rope_scaling_type = self.meta(f"{a}.rope.scaling.type", None)
        self.rope_scaling_factor = float(self.meta(f"{a}.rope.scaling.factor", 1.0) or 1.0)
        # YaRN (rope.scaling.type = yarn): the original context and the ramp's bounds.
        self.yarn_original = self.meta(f"{a}.rope.scaling.original_context_length", None)
        self.yarn_beta_fast = float(self.meta(f"{a}.rope.scaling.yarn_beta_fast", 32.0))
        self.yarn_beta_slow = float(self.meta(f"{a}.rope.scaling.yarn_beta_slow", 1.0))
        self.yarn_attn_factor = float(self.meta(f"{a}.rope.scaling.attn_factor", 1.0))
        # Phi-3's LongRoPE: the long factors when the model's context exceeds the
        # original one (as llama.cpp chooses), the short ones otherwise; the rotated
        # vectors are scaled by rope.scaling.attn_factor.
        self.ctx_len = int(self.meta(f"{a}.context_length", 4096))
        self.longrope = None
        if "rope_factors_long.weight" in self.tensors:
            orig = int(self.meta(f"{a}.rope.scaling.original_context_length"))
            name = "rope_factors_long.weight"
            if self.ctx_len <= orig and "rope_factors_short.weight" in self.tensors:
                name = "rope_factors_short.weight"
            self.longrope = name
        # Gemma3 specifics
        self.sliding_window = self.meta(f"{a}.attention.sliding_window", None)
        self.rope_local_base = float(self.meta(f"{a}.rope.local.freq_base",
                                     self.meta(f"{a}.rope.local_freq_base", 10000.0)))
        self.swa_pattern = int(self.meta(f"{a}.attention.sliding_window_pattern", 6))
        self.softcap = self.meta(f"{a}.final_logit_softcapping", None)
        self.attn_softcap = self.meta(f"{a}.attn_logit_softcapping", None)
        qpas = self.meta(f"{a}.attention.query_pre_attn_scalar", None)
        self.attn_scale = 1.0 / math.sqrt(float(qpas) if qpas else float(self.head_dim))
        self.bos_id = self.meta("tokenizer.ggml.bos_token_id", None)
        self.add_bos = bool(self.meta("tokenizer.ggml.add_bos_token", False))
        self._tokens = None
        self._weights = {}

    def meta(self, key, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    @property
    def tokens(self):
        if self._tokens is None:
            self._tokens = self.meta("tokenizer.ggml.tokens", [])
        return self._tokens

    def has(self, name):
        return name in self.tensors

    def _shape(self, t):
        # reader's shape is ggml order (ne0 = contiguous dim first); numpy wants it reversed
        return tuple(int(d) for d in reversed(list(t.shape)))

    def weight(self, name):
        """Full tensor dequantized to float32 in numpy (row-major) shape, cached."""
        w = self._weights.get(name)
        if w is None:
            t = self.tensors[name]
            w = np.ascontiguousarray(
                dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
                .reshape(self._shape(t)))
            self._weights[name] = w
        return w

    def opt(self, name):
        return self.weight(name) if self.has(name) else None

    def rows(self, name, idx):
        """Selected rows of a 2-D tensor (e.g. an embedding lookup) without dequantizing all."""
        if name in self._weights:
            return self._weights[name][idx]
        t = self.tensors[name]
        shape = self._shape(t)
        data = t.data.reshape(shape[0], -1)  # one row of blocks per matrix row
        return dequantize(data[idx], t.tensor_type).astype(np.float32).reshape(len(idx), shape[1])


# ----------------------------------------------------------------------------
# Math helpers
# ----------------------------------------------------------------------------

def rmsnorm(x, w, eps):
    x64 = x.astype(np.float64)
    inv = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    return (x64 * inv).astype(np.float32) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64 ** 3)))).astype(np.float32)


def yarn_inv_freq(base, dim, factor, original, beta_fast, beta_slow):
    """YaRN's frequencies (arXiv 2309.00071): interpolated below the ramp, kept above."""
    def corr_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1.0 - ramp
    return interpolation * (1.0 - keep) + extrapolation * keep


def rope(x, pos, base, rot_dim, neox, pos_scale=1.0, freq_factors=None, yarn=None, mscale=1.0):
    """x: (n_tok, n_heads, head_dim). Rotates the first rot_dim dims of each head.

    neox=False: rotate adjacent pairs (2i, 2i+1); neox=True: pairs (i, i + rot_dim/2).
    Pair i uses angle pos / pos_scale * base^(-2i/rot_dim) / freq_factors[i] (Llama 3's
    rope_freqs.weight, as llama.cpp applies it).
    """
    half = rot_dim // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2.0 / rot_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float64)[:half]
    if yarn is not None:
        factor, original, beta_fast, beta_slow, attn_factor = yarn
        inv_freq = yarn_inv_freq(base, rot_dim, factor, original, beta_fast, beta_slow)
        mscale = attn_factor * (0.1 * math.log(factor) + 1.0)
    ang = (pos.astype(np.float64) / pos_scale)[:, None] * inv_freq[None, :]  # (n, half)
    cos = np.cos(ang)[:, None, :] * mscale
    sin = np.sin(ang)[:, None, :] * mscale
    x64 = x.astype(np.float64)
    out = x64.copy()
    if neox:
        a = x64[..., :half]
        b = x64[..., half:rot_dim]
        out[..., :half] = a * cos - b * sin
        out[..., half:rot_dim] = a * sin + b * cos
    else:
        a = x64[..., 0:rot_dim:2]
        b = x64[..., 1:rot_dim:2]
        out[..., 0:rot_dim:2] = a * cos - b * sin
        out[..., 1:rot_dim:2] = a * sin + b * cos
    return out.astype(np.float32)


def linear(x, w, b=None):
    y = x @ w.T
    if b is not None:
        y = y + b
    return y


# ----------------------------------------------------------------------------
# Forward pass with a simple KV cache
# ----------------------------------------------------------------------------

class Runner:
    def __init__(self, m: Model):
        self.m = m
        self.k_cache = [None] * m.n_layer  # per layer: (n_past, n_head_kv, head_dim)
        self.v_cache = [None] * m.n_layer
        self.n_past = 0
        if m.has("output.weight"):
            self.out_name = "output.weight"
        else:
            self.out_name = "token_embd.weight"  # tied embeddings

    def layer_params(self, il):
        m = self.m
        is_gemma = m.arch == "gemma3"
        neox = m.arch in ("qwen2", "qwen3", "gemma3", "phi3")
        base = m.rope_base
        window = None
        pos_scale = 1.0
        if is_gemma:
            is_global = (il + 1) % m.swa_pattern == 0
            if is_global:
                if m.rope_scaling_type == "linear":
                    pos_scale = m.rope_scaling_factor
            else:
                base = m.rope_local_base
                window = int(m.sliding_window) if m.sliding_window else None
        elif m.rope_scaling_type == "linear":
            pos_scale = m.rope_scaling_factor
        return neox, base, window, pos_scale

    def forward(self, ids, want_logits="all"):
        """Process new token ids after the cached ones. Returns logits (n_rows, vocab)."""
        m = self.m
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        pos = np.arange(self.n_past, self.n_past + n)
        x = m.rows("token_embd.weight", ids)
        if m.arch == "gemma3":
            x = x * np.float32(math.sqrt(m.n_embd))
        H, Hkv, D, Dv = m.n_head, m.n_head_kv, m.head_dim, m.head_dim_v
        group = H // Hkv

        for il in range(m.n_layer):
            p = f"blk.{il}."
            neox, base, window, pos_scale = self.layer_params(il)

            h = rmsnorm(x, m.weight(p + "attn_norm.weight"), m.eps)
            if m.has(p + "attn_qkv.weight"):
                qkv = linear(h, m.weight(p + "attn_qkv.weight"))
                q = qkv[:, : H * D].reshape(n, H, D)
                k = qkv[:, H * D : (H + Hkv) * D].reshape(n, Hkv, D)
                v = qkv[:, (H + Hkv) * D :].reshape(n, Hkv, Dv)
            else:
                q = linear(h, m.weight(p + "attn_q.weight"), m.opt(p + "attn_q.bias")).reshape(n, H, D)
                k = linear(h, m.weight(p + "attn_k.weight"), m.opt(p + "attn_k.bias")).reshape(n, Hkv, D)
                v = linear(h, m.weight(p + "attn_v.weight"), m.opt(p + "attn_v.bias")).reshape(n, Hkv, Dv)
            if m.has(p + "attn_q_norm.weight"):
                q = rmsnorm(q, m.weight(p + "attn_q_norm.weight"), m.eps)
                k = rmsnorm(k, m.weight(p + "attn_k_norm.weight"), m.eps)
            rd = min(m.rope_dim, D)
            ff = m.opt("rope_freqs.weight") if m.arch != "gemma3" else None
            yarn = None
            if m.rope_scaling_type == "yarn" and m.arch != "gemma3":
                yarn = (m.rope_scaling_factor, float(m.yarn_original), m.yarn_beta_fast,
                        m.yarn_beta_slow, m.yarn_attn_factor)
            mscale = 1.0
            if m.longrope is not None:
                ff = m.weight(m.longrope)
                mscale = m.yarn_attn_factor
            q = rope(q, pos, base, rd, neox, pos_scale, ff, yarn, mscale)
            k = rope(k, pos, base, rd, neox, pos_scale, ff, yarn, mscale)

            if self.k_cache[il] is None:
                K, V = k, v
            else:
                K = np.concatenate([self.k_cache[il], k], axis=0)
                V = np.concatenate([self.v_cache[il], v], axis=0)
            self.k_cache[il], self.v_cache[il] = K, V
            kpos = np.arange(K.shape[0])

            # mask: key j visible to query i iff j <= i (and i - j < window for SWA layers)
            diff = pos[:, None] - kpos[None, :]
            allowed = diff >= 0
            if window is not None:
                allowed &= diff < window

            attn = np.empty((n, H, Dv), dtype=np.float32)
            for hk in range(Hkv):
                Kh = K[:, hk, :]                      # (nk, D)
                Vh = V[:, hk, :]                      # (nk, Dv)
                for g in range(group):
                    hq = hk * group + g
                    s = (q[:, hq, :] @ Kh.T).astype(np.float64) * m.attn_scale  # (n, nk)
                    if m.attn_softcap:
                        c = float(m.attn_softcap)
                        s = np.tanh(s / c) * c
                    s = np.where(allowed, s, -np.inf)
                    s -= s.max(axis=1, keepdims=True)
                    e = np.exp(s)
                    e /= e.sum(axis=1, keepdims=True)
                    attn[:, hq, :] = (e.astype(np.float32) @ Vh)
            o = linear(attn.reshape(n, H * Dv), m.weight(p + "attn_output.weight"))
            if m.has(p + "post_attention_norm.weight"):
                o = rmsnorm(o, m.weight(p + "post_attention_norm.weight"), m.eps)
            x = x + o

            h = rmsnorm(x, m.weight(p + "ffn_norm.weight"), m.eps)
            if m.has(p + "ffn_gate.weight"):
                gate = linear(h, m.weight(p + "ffn_gate.weight"))
                up = linear(h, m.weight(p + "ffn_up.weight"))
            else:
                # Phi-3: ffn_up holds the gate's rows, then the up projection's.
                gate_up = linear(h, m.weight(p + "ffn_up.weight"))
                gate, up = gate_up[:, : m.n_ff], gate_up[:, m.n_ff :]
            act = gelu_tanh(gate) if m.arch == "gemma3" else silu(gate)
            f = linear(act * up, m.weight(p + "ffn_down.weight"))
            if m.has(p + "post_ffw_norm.weight"):
                f = rmsnorm(f, m.weight(p + "post_ffw_norm.weight"), m.eps)
            x = x + f

        self.n_past += n
        if want_logits == "last":
            x = x[-1:]
        x = rmsnorm(x, m.weight("output_norm.weight"), m.eps)
        logits = linear(x, m.weight(self.out_name)).astype(np.float32)
        if m.softcap:
            c = float(m.softcap)
            logits = (np.tanh(logits.astype(np.float64) / c) * c).astype(np.float32)
        return logits


# ----------------------------------------------------------------------------
# Token text helpers (for printing only)
# ----------------------------------------------------------------------------

def _byte_decoder():
    # GPT-2 style byte-level BPE: printable bytes map to themselves, the rest to U+0100 onwards.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def detokenize(model, ids):
    toks = model.tokens
    kind = model.meta("tokenizer.ggml.model", "")
    if kind == "gpt2":
        dec = _byte_decoder()
        out = bytearray()
        for i in ids:
            for ch in toks[i]:
                if ch in dec:
                    out.append(dec[ch])
                else:
                    out += ch.encode("utf-8")
        return out.decode("utf-8", errors="replace")
    out = bytearray()
    for i in ids:
        t = toks[i]
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            out.append(int(t[3:5], 16))
        else:
            out += t.replace("\u2581", " ").encode("utf-8")
    return out.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------

def parse_ids(text):
    return [int(t) for t in text.replace(",", " ").split()]


def main():
    ap = argparse.ArgumentParser(description="Independent fp32 numpy reference forward pass for GGUF models.")
    ap.add_argument("model")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--ids", help="comma separated token ids")
    g.add_argument("--ids-file", help="file of whitespace/comma separated token ids")
    ap.add_argument("--out", help="write logits (raw little-endian f32, n_tokens x vocab)")
    ap.add_argument("--bos", action="store_true", help="prepend tokenizer.ggml.bos_token_id")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--last-only", action="store_true", help="compute/write logits for the last position only")
    ap.add_argument("--greedy", type=int, default=0, help="print greedy continuation of N tokens")
    args = ap.parse_args()

    if args.ids is not None:
        ids = parse_ids(args.ids)
    else:
        with open(args.ids_file) as f:
            ids = parse_ids(f.read())

    t0 = time.time()
    m = Model(args.model)
    if args.bos:
        if m.bos_id is None:
            raise SystemExit("model has no tokenizer.ggml.bos_token_id")
        ids = [int(m.bos_id)] + ids
    elif m.add_bos and (not ids or ids[0] != m.bos_id):
        print(f"note: model sets add_bos_token but no BOS ({m.bos_id}) was given; use --bos", file=sys.stderr)
    if not ids:
        raise SystemExit("no token ids")

    runner = Runner(m)
    logits = runner.forward(ids, want_logits="last" if args.last_only else "all")
    t1 = time.time()

    if args.out:
        tmp = args.out + ".tmp"
        np.ascontiguousarray(logits, dtype="<f4").tofile(tmp)
        os.replace(tmp, args.out)

    print(f"arch={m.arch} n_tokens={len(ids)} vocab={logits.shape[1]} forward_s={t1 - t0:.2f}")
    last = logits[-1]
    top = np.argsort(-last, kind="stable")[: args.top]
    toks = m.tokens
    for rank, i in enumerate(top):
        print(f"  {rank + 1}: id={int(i)} tok={toks[i]!r} logit={float(last[i]):.4f}")

    if args.greedy > 0:
        out_ids = []
        nxt = int(np.argmax(last))
        for step in range(args.greedy):
            out_ids.append(nxt)
            if step + 1 == args.greedy:
                break
            nxt = int(np.argmax(runner.forward([nxt], want_logits="last")[-1]))
        print(f"greedy ids: {out_ids}")
        print(f"greedy text: {detokenize(m, out_ids)!r}")


if __name__ == "__main__":
    main()
