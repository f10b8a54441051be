#!/usr/bin/env python3
"""Seeds for the fuzz targets that come from real files, written into CORPUS/<target>/:
tiny GGUF models written with the `gguf` package (llama and qwen2 layouts, with a
tokenizer and a chat template), and the chat templates of the models in the data
directory (read from their GGUF metadata). Nothing here is committed; scripts/fuzz
calls it."""
import os
import sys
from pathlib import Path

import numpy as np

corpus = Path(sys.argv[1])
data_dir = Path(os.environ.get("KVMERGER_HOME") or Path.home() / ".cache" / "kvmerger")

try:
    import gguf
except ImportError:
    print("fuzz seeds: the gguf package is missing (pip install gguf); GGUF seeds skipped")
    sys.exit(0)

out = corpus / "gguf_file"
out.mkdir(parents=True, exist_ok=True)
for arch in ("llama", "qwen2"):
    path = out / f"tiny-{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", "c", "<|im_end|>"])
    w.add_token_types([1, 1, 1, 1, 3])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(4)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (5, 8),
        "blk.0.attn_norm.weight": (8,),
        "blk.0.attn_q.weight": (8, 8),
        "blk.0.attn_k.weight": (4, 8),
        "blk.0.attn_v.weight": (4, 8),
        "blk.0.attn_output.weight": (8, 8),
        "blk.0.ffn_norm.weight": (8,),
        "blk.0.ffn_gate.weight": (16, 8),
        "blk.0.ffn_up.weight": (16, 8),
        "blk.0.ffn_down.weight": (8, 16),
        "output_norm.weight": (8,),
    }
    if arch == "qwen2":
        shapes.update({"blk.0.attn_q.bias": (8,), "blk.0.attn_k.bias": (4,), "blk.0.attn_v.bias": (4,)})
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

templates = corpus / "chat_template"
templates.mkdir(parents=True, exist_ok=True)
for model in sorted((data_dir / "models").glob("*.gguf")):
    try:
        r = gguf.GGUFReader(str(model))
        f = r.fields.get("tokenizer.chat_template")
        if f is not None:
            text = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
            (templates / f"{model.stem}.jinja").write_text(text)
    except Exception as e:  # a damaged cache file is not the fuzzer's business
        print(f"fuzz seeds: {model.name}: {e}")
print(f"fuzz seeds written under {corpus}")
