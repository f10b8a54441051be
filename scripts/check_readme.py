#!/usr/bin/env python3
"""Checks the README's commands: every `kvmerger ...` line of its shell blocks must
parse (the binary is run with KVMERGER_PARSE_ONLY=1, which stops after the command
line is read), and the cheap ones, listed below, must run and exit 0.

  python3 scripts/check_readme.py [--bin target/release/kvmerger]
"""

import argparse
import os
import re
import shlex
import subprocess
import sys

# Examples cheap enough to run for real here (seconds, no download beyond the test
# models). Matched against the start of the example.
RUN = [
    "kvmerger methods",
    "kvmerger fetch --list",
    "kvmerger eval tasks",
]


def examples(readme):
    """The `kvmerger` commands of the README's sh blocks, with continuation lines
    joined and comments dropped."""
    out, block, cur = [], False, ""
    for line in open(readme, encoding="utf-8"):
        if line.startswith("```"):
            block = line.strip() in ("```sh", "```bash") if not block else False
            continue
        if not block:
            continue
        text = line.rstrip("\n")
        cur += text.rstrip("\\").rstrip() + " " if text.rstrip().endswith("\\") else text
        if text.rstrip().endswith("\\"):
            continue
        cmd = re.sub(r"\s+#.*$", "", cur).strip()
        cur = ""
        if cmd.startswith("kvmerger "):
            out.append(cmd)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/kvmerger")
    ap.add_argument("--readme", default="README.md")
    args = ap.parse_args()
    bad = []
    cmds = examples(args.readme)
    for cmd in cmds:
        argv = shlex.split(cmd.replace("$KEY", "key"))
        argv[0] = args.bin
        env = dict(os.environ, KVMERGER_PARSE_ONLY="1")
        r = subprocess.run(argv, capture_output=True, text=True, env=env)
        if r.returncode != 0 or "parsed" not in r.stdout:
            bad.append((cmd, r.stderr.strip()[-300:]))
            continue
        if any(cmd.startswith(p) for p in RUN):
            r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                bad.append((cmd, r.stderr.strip()[-300:]))
    print(f"{len(cmds)} README commands parsed, {sum(any(c.startswith(p) for p in RUN) for c in cmds)} run")
    for cmd, err in bad:
        print(f"FAILED: {cmd}\n  {err}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
