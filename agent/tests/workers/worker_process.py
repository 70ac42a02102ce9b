"""A worker process spoken to over the worker protocol (JSON lines on
stdin/stdout), as the agent does; the lines it writes are read on a
thread. Shared by the worker tests."""
import json
import os
import queue
import subprocess
import threading
import time


class WorkerProcess:
    def __init__(self, argv, cwd=None, env=None, timeout=5, stderr=None):
        base = {k: v for k, v in os.environ.items() if not k.startswith("RM_")}
        base.update(env or {})
        self.timeout = timeout
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     text=True, env=base, bufsize=1, cwd=cwd)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def send(self, rid, method, params):
        self.proc.stdin.write(json.dumps({"id": rid, "method": method, "params": params}) + "\n")
        self.proc.stdin.flush()

    def next(self, timeout=None):
        return self.lines.get(timeout=self.timeout if timeout is None else timeout)

    def final(self, rid, timeout=None):
        """The final answer of `rid`, skipping its tokens and progress."""
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg = self.next(max(0.01, end - time.monotonic()))
            assert msg["id"] == rid, msg
            if "result" in msg or "error" in msg:
                return msg

    def close(self):
        self.send(0, "shutdown", {})
        assert self.proc.wait(timeout=max(10, self.timeout // 4)) == 0
