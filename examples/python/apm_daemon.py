#!/usr/bin/env python3
"""A bmw daemon task in Python, standard library only.

bmw starts this once per instance of `daemon:apm:pre_calculate` (see
examples/kinds.toml). The payload comes as JSON on stdin (and in BMW_PAYLOAD);
the instance loops for its `data_id`, printing a line every second (each line
goes into the worker's log with the task's uni_id; `"interval": <seconds>`
sets another pace), until bmw stops it with SIGTERM (delete, reload,
hand-over, shutdown).

Exiting is a failure: bmw restarts the instance with its back-off. A payload
with `"fail_after": <seconds>` exits with status 1 after that long, to show it.

When APM_PID_DIR is set, each start writes `<APM_PID_DIR>/<data_id>.json`
with this process's pid, payload and counts (the tests read it).
"""

import json
import os
import signal
import sys
import time


class Stopping(Exception):
    """SIGTERM came: bmw stops this instance."""


def on_sigterm(signum, frame):
    raise Stopping()


def main():
    signal.signal(signal.SIGTERM, on_sigterm)
    payload = json.load(sys.stdin)
    data_id = str(payload.get("data_id", "unknown"))
    state_dir = os.environ.get("APM_PID_DIR")
    if state_dir:
        state = {
            "pid": os.getpid(),
            "payload": payload,
            "uni_id": os.environ.get("BMW_UNI_ID"),
            "worker_id": os.environ.get("BMW_WORKER_ID"),
            "retry_count": int(os.environ.get("BMW_RETRY_COUNT", "0")),
            "reload_count": int(os.environ.get("BMW_RELOAD_COUNT", "0")),
        }
        path = os.path.join(state_dir, data_id + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(path + ".tmp", path)
    fail_after = payload.get("fail_after")
    interval = float(payload.get("interval", 1))
    started = time.monotonic()
    print(f"pre-calculating data_id {data_id} (retry {os.environ.get('BMW_RETRY_COUNT')}, "
          f"reload {os.environ.get('BMW_RELOAD_COUNT')})", flush=True)
    try:
        while True:
            if fail_after is not None and time.monotonic() - started >= float(fail_after):
                print(f"data_id {data_id}: giving up after {fail_after}s", file=sys.stderr, flush=True)
                sys.exit(1)
            print(f"data_id {data_id}: tick at {time.strftime('%H:%M:%S')}", flush=True)
            pause = interval if fail_after is None else min(interval, float(fail_after))
            time.sleep(pause)
    except Stopping:
        print(f"data_id {data_id}: stopping", flush=True)

if __name__ == "__main__":
    main()
