"""rm_worker.serve() stops a running request on the agent's `cancel`
message and answers it with kind "cancelled", and the process serves the
next request (the model stays loaded).

Each test runs a small worker built on agent/workers/common/rm_worker.py in
a process of its own and speaks the protocol to it over stdin/stdout, as the
agent does. Standard library + pytest only; no agent binary.

Run: python3 -m pytest -q agent/tests/workers   (e2e/test.sh does)
"""
import sys
import time
from pathlib import Path

from worker_process import WorkerProcess

HERE = Path(__file__).resolve().parent
COMMON = HERE.parents[1] / "workers" / "common"

# "tokens": emits one token every 20 ms, up to 500 (10 s). "loop": the same
# without emitting, looking at emit.cancelled() (a non-streaming loop).
# "swallow": catches the Cancelled that emit raises and returns a result
# anyway. Every prompt of a request counts one "load" of the worker.
WORKER = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
import rm_worker

class W(rm_worker.Worker):
    compiler_version = "cancel-test"
    loads = 0

    def generate(self, params, emit):
        W.loads += 1
        mode = params["prompts"][0]
        n = 0
        for k in range(500):
            if mode == "loop":
                if emit.cancelled():
                    raise rm_worker.Cancelled()
            elif mode == "swallow":
                try:
                    emit(0, k)
                except rm_worker.Cancelled:
                    break
            else:
                emit(0, k)
            n += 1
            time.sleep(0.02)
        return [{"token_ids": [], "text": "%d %d" % (n, W.loads), "finish_reason": "length"}]

rm_worker.serve(W())
'''


class Worker(WorkerProcess):
    """The test worker above, in a process of its own."""

    def __init__(self, tmp_path):
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        super().__init__([sys.executable, str(script), str(COMMON)], timeout=5)

    def generate(self, rid, prompt):
        self.send(rid, "generate", {"prompts": [prompt], "params": {}, "stream": True})


def test_hello_says_the_worker_takes_cancel(tmp_path):
    w = Worker(tmp_path)
    w.send(1, "hello", {"protocol": 1})
    assert w.final(1)["result"]["cancel"] is True
    w.close()


def test_a_cancel_stops_emitting_and_the_process_serves_the_next_request(tmp_path):
    w = Worker(tmp_path)
    w.generate(1, "tokens")
    for _ in range(3):
        assert "token" in w.next()
    t = time.monotonic()
    # No answer to the cancel itself: the request's own answer follows.
    w.send(2, "cancel", {"id": 1})
    answer = w.final(1)
    assert answer["error"]["kind"] == "cancelled", answer
    assert time.monotonic() - t < 1
    # Nothing more for request 1, and the next request runs in the same
    # process (the worker's state is kept: its second request).
    w.generate(3, "swallow")
    assert w.next()["id"] == 3
    w.send(4, "cancel", {"id": 3})
    answer = w.final(3)
    # The worker code caught Cancelled and returned a result: a result is
    # an answer too, and says the process is free.
    assert answer["result"]["outputs"][0]["text"].split()[1] == "2", answer
    w.generate(5, "loop")
    time.sleep(0.2)
    w.send(6, "cancel", {"id": 5})
    answer = w.final(5)
    assert answer["error"]["kind"] == "cancelled", answer
    w.close()


def test_a_request_cancelled_before_it_started_is_not_run_and_stale_cancels_are_ignored(tmp_path):
    w = Worker(tmp_path)
    w.generate(1, "tokens")
    w.generate(2, "tokens")
    assert w.next()["id"] == 1
    # Request 2 waits behind 1: cancelled there, it never starts.
    w.send(3, "cancel", {"id": 2})
    w.send(4, "cancel", {"id": 1})
    assert w.final(1)["error"]["kind"] == "cancelled"
    answer = w.final(2)
    assert answer["error"]["kind"] == "cancelled", answer
    # A cancel for a request already answered (it crossed the answer on
    # the way) is not answered and changes nothing.
    w.send(5, "cancel", {"id": 1})
    w.send(6, "generate", {"prompts": ["loop"], "params": {}, "stream": False})
    time.sleep(0.3)
    w.send(7, "cancel", {"id": 6})
    answer = w.final(6)
    assert answer["error"]["kind"] == "cancelled", answer
    w.close()
