#!/usr/bin/env bash
# llama.cpp's tokenizer tests (models/ggml-vocab-*.gguf with .inp/.out), taken from the
# llama-cpp-python source package, which vendors llama.cpp. Downloaded once into the
# data directory (as kvmerger finds it: $KVMERGER_HOME, $XDG_CACHE_HOME/kvmerger or
# ~/.cache/kvmerger), never committed; crates/engine/tests/vocab_llama_cpp.rs reads
# them from there.
set -euo pipefail
if [ -n "${KVMERGER_HOME:-}" ]; then
  data="$KVMERGER_HOME"
elif [ -n "${XDG_CACHE_HOME:-}" ] && [ "${XDG_CACHE_HOME:0:1}" = / ]; then
  data="$XDG_CACHE_HOME/kvmerger"
else
  data="$HOME/.cache/kvmerger"
fi
dest="$data/llama-vocab"
version="0.3.36"
if [ -f "$dest/.complete-$version" ]; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --disable-pip-version-check "llama-cpp-python==$version" \
  --no-deps --no-binary llama-cpp-python -d "$tmp" >&2
tar xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$tmp" --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*'
mkdir -p "$dest.partial"
cp "$tmp"/llama_cpp_python-"$version"/vendor/llama.cpp/models/ggml-vocab-* "$dest.partial"/
rm -rf "$dest"
mv "$dest.partial" "$dest"
touch "$dest/.complete-$version"
echo "llama.cpp vocabulary tests in $dest" >&2
