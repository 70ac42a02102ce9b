"""Runs a `kubectl get --watch -o jsonpath=...` that prints "NAME VALUE" lines
and prints the time (epoch seconds) at which N distinct names were seen with
VALUE (any value when VALUE is empty). A watch costs the machine far less than
polling with a new kubectl process every fraction of a second, and its time is
exact.

Usage: count_until.py N VALUE -- kubectl get ... --watch -o jsonpath=...
"""

import subprocess
import sys
import time


def main() -> int:
    sep = sys.argv.index("--")
    want, value = int(sys.argv[1]), sys.argv[2]
    watch = subprocess.Popen(sys.argv[sep + 1 :], stdout=subprocess.PIPE, text=True)
    seen = set()
    try:
        for line in watch.stdout:
            name, _, got = line.strip().partition(" ")
            if name and (not value or got == value):
                seen.add(name)
                if len(seen) >= want:
                    print(f"{time.time():.3f}")
                    return 0
    finally:
        watch.kill()
    print(f"the watch ended after {len(seen)} of {want}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
