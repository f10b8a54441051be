"""`kvmerger serve` as a child process, for the scripts that test it from outside
(load_test.py, soak_test.py): start on a loopback port, read its memory, stop it."""

import re
import signal
import subprocess
import sys
import threading
import time


def rss_kib(pid):
    """Resident memory of a process, in KiB (0 when unknown)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start(cmd, wait_s=300):
    """Starts the server and waits for its address; returns (process, host, port).
    Exits the script when the server does not come up."""
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line, m, t0 = "", None, time.time()
    while time.time() - t0 < wait_s:
        line = server.stderr.readline()
        m = re.search(r"http://(127\.0\.0\.1):(\d+)", line)
        if m or not line:
            break
    if not m:
        server.kill()
        sys.exit(f"the server did not start: {line}")
    # Keep reading stderr so the server never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    return server, m.group(1), int(m.group(2))


def stop(server, wait_s=60):
    """SIGTERM, then the exit code (or 'killed' when it did not exit in time)."""
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(wait_s)
    except subprocess.TimeoutExpired:
        server.kill()
        return "killed"


def conclude(code, checks):
    """Exits non-zero when the server did not stop cleanly or a check failed."""
    if code != 0:
        sys.exit(f"the server did not exit cleanly on SIGTERM ({code})")
    if not all(checks.values()):
        sys.exit(f"checks failed: {[k for k, v in checks.items() if not v]}")
