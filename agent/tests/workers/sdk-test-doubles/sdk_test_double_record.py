"""TEST DOUBLE helper: writes what an SDK call received, with JSON types kept
(an int stays a number, a bool stays true/false, a str stays a string)."""
import json
import os

RECORD = "test-double-call.json"


def record(out_dir, call, model, kwargs):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, RECORD), "w") as f:
        json.dump({"call": call, "model": model, "kwargs": kwargs,
                   "types": {k: type(v).__name__ for k, v in kwargs.items()}}, f)
