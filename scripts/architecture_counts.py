#!/usr/bin/env python3
"""The counts docs/architecture.md reports, from the source alone (no build needed).

    python3 scripts/architecture_counts.py          # the counts, as a table
    python3 scripts/architecture_counts.py --mermaid   # the crate graph, as a Mermaid chart
    python3 scripts/architecture_counts.py --check docs/architecture.md
                                            # fails when the doc's chart is not today's

Counted:
- import cycles between the files of each crate (strongly connected components of the
  graph "file A names an item of file B"; test modules left out), and whether each one
  lies inside the kernel internals (tensors/src/quant/);
- the places that start KVzip's reconstruction pass (calls of `reconstruction_scores`);
- `is_noop` calls and `Option<Compressor>` / `Option<&Compressor>` outside the crates
  that define the lifecycle (compression and engine);
- functions over 100 lines (scripts/function_lengths.py's brace matching);
- per crate: lines, files, top-level modules, public items;
- the crate dependency graph, from `cargo metadata` when cargo is there, else from the
  Cargo.toml files.
"""
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRATES = ROOT / "crates"


def strip_tests(text):
    """The file without its `#[cfg(test)]` module (by convention the last item)."""
    m = re.search(r"^#\[cfg\(test\)\]\s*\n\s*mod \w+\s*\{", text, re.M)
    return text[: m.start()] if m else text


def strip_comments(text):
    """The text with comments removed and string literals emptied, scanned character
    by character (a `//` inside a string is not a comment; a lifetime is not a char)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == "r" and re.match(r'r#*"', text[i : i + 8]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r"r(#*)\"", text[i : i + 8]).group(1)
            j = text.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if j < 0 else j + 1 + len(hashes)
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^'\\])'", text[i : i + 4]):
            m = re.match(r"'(\\.|[^'\\])'", text[i : i + 4])
            out.append("' '")
            i += len(m.group(0))
        elif c == "'" and re.match(r"'\\u\{[0-9a-fA-F]+\}'", text[i : i + 12]):
            i += len(re.match(r"'\\u\{[0-9a-fA-F]+\}'", text[i : i + 12]).group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(src, path):
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def crate_files(crate):
    src = crate / "src"
    files = {}
    for p in sorted(src.rglob("*.rs")):
        if p.name == "tests.rs" or (p.name == "bench.rs" and p.parent != src) or "/tests/" in str(p):
            continue
        files[module_of(src, p)] = p
    return src, files


def resolve(path, mods):
    """The longest module of `mods` that `path` (a tuple of names) lies in."""
    for n in range(len(path), 0, -1):
        if tuple(path[:n]) in mods:
            return tuple(path[:n])
    return None


def use_paths(text):
    """Every `crate::a::b` path and every `use` tree below `crate::` or `super::`,
    expanded to plain paths (only the first level of braces matters here)."""
    out = []
    for m in re.finditer(r"\buse\s+((?:crate|super|self)(?:::\w+)*)::\{([^;]*)\};", text, re.S):
        base = m.group(1).split("::")
        for item in re.split(r",", m.group(2)):
            item = item.strip().split("::")[0].split(" ")[0]
            if item:
                out.append(base + [item])
    for m in re.finditer(r"\b((?:crate|super)(?:::\w+)+)", text):
        out.append(m.group(1).split("::"))
    return out


def edges_of(crate):
    src, files = crate_files(crate)
    mods = set(files)
    edges = {m: set() for m in mods}
    for mod, path in files.items():
        text = strip_comments(strip_tests(path.read_text()))
        for parts in use_paths(text):
            if parts[0] == "crate":
                target = tuple(parts[1:])
            else:
                # `super` is the parent module of this file's module, in a.rs as in
                # a/mod.rs; `self` is the module itself.
                here, i = list(mod), 0
                while i < len(parts) and parts[i] in ("super", "self"):
                    if parts[i] == "super":
                        here = here[:-1]
                    i += 1
                target = tuple(here + parts[i:])
            t = resolve(target, mods)
            if t is not None and t != mod and t != ():
                edges[mod].add(t)
        # Bare `submodule::item` paths in a parent file (no `crate::`/`super::`).
        for child in mods:
            if len(child) == len(mod) + 1 and child[: len(mod)] == mod:
                if re.search(r"\b" + child[-1] + r"::\w", text):
                    edges[mod].add(child)
    return files, edges


def sccs(edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def grep_count(pattern, paths):
    n, where = 0, set()
    for p in paths:
        text = strip_comments(strip_tests(p.read_text()))
        k = len(re.findall(pattern, text))
        if k:
            n += k
            where.add(str(p.relative_to(ROOT)))
    return n, sorted(where)


def crate_graph():
    try:
        meta = json.loads(
            subprocess.run(
                ["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"],
                cwd=ROOT, capture_output=True, text=True, check=True,
            ).stdout
        )
        names = {p["name"] for p in meta["packages"]}
        return {
            p["name"]: sorted(d["name"] for d in p["dependencies"] if d["name"] in names and d["kind"] is None)
            for p in meta["packages"]
        }
    except (OSError, subprocess.CalledProcessError):
        graph = {}
        tomls = sorted(CRATES.glob("*/Cargo.toml"))
        names = {re.search(r'^name\s*=\s*"([^"]+)"', t.read_text(), re.M).group(1): t for t in tomls}
        for name, t in names.items():
            deps = re.search(r"^\[dependencies\](.*?)(^\[|\Z)", t.read_text(), re.M | re.S)
            graph[name] = sorted(n for n in names if deps and re.search(r"^" + re.escape(n) + r"\s*=", deps.group(1), re.M))
        return graph


def mermaid(graph):
    """The crates (with their top-level modules) and their dependencies."""
    lines = ["```mermaid", "flowchart TD"]
    for crate in sorted(p for p in CRATES.iterdir() if (p / "src").is_dir()):
        name = re.search(r'^name\s*=\s*"([^"]+)"', (crate / "Cargo.toml").read_text(), re.M).group(1)
        _, files = crate_files(crate)
        tops = sorted({m[0] for m in files if m})
        rows = [", ".join(tops[i : i + 6]) for i in range(0, len(tops), 6)]
        label = f"<b>{name}</b><br/>" + "<br/>".join(rows)
        lines.append(f'  {crate.name}["{label}"]')
    ids = {re.search(r'^name\s*=\s*"([^"]+)"', (p / "Cargo.toml").read_text(), re.M).group(1): p.name for p in CRATES.iterdir() if (p / "Cargo.toml").exists()}
    for name, deps in sorted(graph.items()):
        for d in deps:
            lines.append(f"  {ids[name]} --> {ids[d]}")
    lines.append("```")
    return "\n".join(lines)


def main():
    graph = crate_graph()
    if "--mermaid" in sys.argv:
        print(mermaid(graph))
        return
    if "--check" in sys.argv:
        doc = pathlib.Path(sys.argv[sys.argv.index("--check") + 1]).read_text()
        if mermaid(graph) not in doc:
            sys.exit("the crate chart in the doc is not today's: paste `python3 scripts/architecture_counts.py --mermaid` into it")
        return
    rows = []
    all_cycles, relaxed = [], []
    for crate in sorted(p for p in CRATES.iterdir() if (p / "src").is_dir()):
        files, edges = edges_of(crate)
        cycles = sccs(edges)
        all_cycles += [(crate.name, c) for c in cycles]
        loose = {m: {t for t in ts if t != m[:-1] and t[:-1] != m} for m, ts in edges.items()}
        relaxed += [(crate.name, c) for c in sccs(loose)]
        text = "".join(p.read_text() for p in files.values())
        tops = {m[0] for m in files if m}
        public = sum(len(re.findall(r"^\s*pub (fn|struct|enum|trait|type|const|static|mod|use) ", strip_tests(p.read_text()), re.M)) for p in files.values())
        rows.append((crate.name, len(text.splitlines()), len(files), len(tops), public))
    print("| crate | lines | files | top-level modules | `pub` items |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    print()
    print("crate dependencies:", "; ".join(f"{k} -> {', '.join(v) or '(none)'}" for k, v in sorted(graph.items())))
    print()
    print(f"import cycles between files, a folder's mod.rs and its own files included: {len(all_cycles)}")
    for c in all_cycles:
        print("  ", f"{c[0]}: " + " <-> ".join("::".join(m) for m in c[1]))
    # The usual reading (and rustc's own layout): a folder's mod.rs declares its files
    # and they name its items, so edges between a module and its direct parent are
    # left out; what remains is a cycle between siblings or across folders.
    all_cycles = [(c, cyc) for c, cyc, in relaxed]
    kernel = [c for c in all_cycles if c[0] == "tensors" and all(m[0] == "quant" for m in c[1])]
    other = [c for c in all_cycles if c not in kernel]
    fmt = lambda c: f"{c[0]}: " + " <-> ".join("::".join(m) for m in c[1])
    print(f"import cycles between files, a folder's mod.rs and its own files left out: {len(all_cycles)} ({len(kernel)} inside the kernel internals, {len(other)} elsewhere)")
    for c in all_cycles:
        print("  ", fmt(c), "(kernel internals)" if c in kernel else "")
    rs = [p for p in CRATES.rglob("*.rs") if "/tests/" not in str(p) and p.name != "tests.rs" and not (p.name == "bench.rs" and p.parent.name != "src")]
    n, where = grep_count(r"\breconstruction_scores\s*\(", [p for p in rs if not str(p).endswith("reconstruct.rs")])
    print(f"places that start KVzip's reconstruction pass: {n} ({', '.join(where)})")
    n, where = grep_count(r"\.is_noop\s*\(", rs)
    print(f"is_noop() calls, all crates: {n} in {len(where)} files")
    n, where = grep_count(r"Option<&?\s*Compressor\b", rs)
    print(f"Option<Compressor> / Option<&Compressor>, all crates: {n} in {len(where)} files")
    callers = [p for p in rs if "/compression/" not in str(p) and "/engine/" not in str(p)]
    n, where = grep_count(r"\.is_noop\s*\(", callers)
    print(f"is_noop() calls outside compression and engine: {n} ({', '.join(where) or '-'})")
    n, where = grep_count(r"Option<&?\s*Compressor\b", callers)
    print(f"Option<Compressor> / Option<&Compressor> outside compression and engine: {n} ({', '.join(where) or '-'})")
    out = subprocess.run([sys.executable, str(ROOT / "scripts/function_lengths.py"), str(ROOT), "0"], capture_output=True, text=True).stdout
    print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
