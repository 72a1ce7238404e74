#!/usr/bin/env python3
"""Checks what `make demo` promises, from the folder it wrote (CI runs it after a short demo):

    /usr/bin/python3 tests/check_demo.py demo_out

the summary exists and is complete, the loss went down, the two pictures exist and are PNGs,
the optimizer state went through the swap file. Prints one line per check; exits 1 on the
first failure."""

import json
import os
import sys

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def main(argv):
    out = argv[1] if len(argv) > 1 else "demo_out"
    failed = []

    def check(ok, what):
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failed.append(what)
        return ok

    summary_path = os.path.join(out, "summary.json")
    if not check(os.path.isfile(summary_path), f"{summary_path} exists"):
        return 1
    with open(summary_path) as f:
        s = json.load(f)
    check(s.get("steps", 0) >= 2, f"trained {s.get('steps')} steps")
    first, last = s.get("loss_first"), s.get("loss_last")
    check(first is not None and last is not None and last < first,
          f"loss went down: {first} -> {last}")
    check(s.get("swap_bytes_read", 0) > 0 and s.get("swap_bytes_written", 0) > 0,
          f"state went through the swap file: read {s.get('swap_bytes_read')} B, "
          f"written {s.get('swap_bytes_written')} B ({s.get('io_backend')})")
    for name in ("loss.png", "timeline.png"):
        path = os.path.join(out, name)
        head = b""
        if os.path.isfile(path):
            with open(path, "rb") as f:
                head = f.read(len(PNG_MAGIC))
        check(head == PNG_MAGIC, f"{path} is a PNG")
    check(os.path.isfile(os.path.join(out, "trace.json")), f"{out}/trace.json exists")
    print(f"{len(failed)} failed" if failed else "demo output: every check passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
