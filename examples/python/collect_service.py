"""A bmw async kind written in Python: a NATS service that bmw sends each task to.

bmw sends every attempt of an `async:collect_es_task` task as one NATS request
to the subject `apm.collect_es` (declared on the worker with
`service = "apm.collect_es"`). This program answers those requests as a NATS
service (nats-py's `nats.micro`: it also answers `$SRV.PING`, `$SRV.INFO` and
`$SRV.STATS`), in the queue group `bmw`, so starting it twice shares the work.

The request: the task's payload as JSON; the headers Bmw-Task-Id, Bmw-Kind,
Bmw-Queue, Bmw-Attempt, Bmw-Max-Retry and Bmw-Deadline (RFC 3339, when the
attempt has a time limit).

The reply, by the NATS services convention:
  success            respond(body): the body is the result
  failure, retried   respond_error("503", "why", headers={"Bmw-Retry-After": "2"})
                     (without Bmw-Retry-After: bmw's back-off); an exception
                     in the handler is answered "500" by nats.micro: retried
  failure, final     a 4xx code, e.g. respond_error("400", "why"): dead-lettered at once

What this one does with a payload (to try each answer):
  {"index": "apm-2024"}                    collects (pretends to), answers {"collected": ...}
  no "index"                               400: not retried
  {"index": ..., "busy_attempts": 2}       503 with Bmw-Retry-After for attempts 1 and 2
  {"index": ..., "slow_attempts": 1,       sleeps that long first on attempts up to 1
   "sleep": 1.5}                           (longer than the task's timeout: retried)

Run it (the venv with the pinned nats-py is made on first use):
  "$(scripts/python-env)" examples/python/collect_service.py --nats-url nats://127.0.0.1:4222
"""

import argparse
import asyncio
import json
import signal
import sys

import nats
from nats.micro import add_service

SUBJECT = "apm.collect_es"
QUEUE_GROUP = "bmw"


def log(text: str) -> None:
    print(text, flush=True)


async def collect(req) -> None:
    headers = req.headers or {}
    task_id = headers.get("Bmw-Task-Id", "?")
    attempt = int(headers.get("Bmw-Attempt", "1"))
    try:
        payload = json.loads(req.data or b"null")
    except ValueError:
        await req.respond_error("400", "the payload is not JSON")
        return
    if not isinstance(payload, dict) or not payload.get("index"):
        await req.respond_error("400", "the payload needs an index")
        return
    if attempt <= int(payload.get("slow_attempts", 0)):
        await asyncio.sleep(float(payload.get("sleep", 1)))
    if attempt <= int(payload.get("busy_attempts", 0)):
        log(f"task {task_id} attempt {attempt}: busy, retry after 0.5 s")
        await req.respond_error("503", "backend busy", headers={"Bmw-Retry-After": "0.5"})
        return
    log(f"task {task_id} attempt {attempt}: collected {payload['index']} (deadline {headers.get('Bmw-Deadline')})")
    await req.respond(json.dumps({"collected": payload["index"], "attempt": attempt}).encode())


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    args = parser.parse_args()
    nc = await nats.connect(args.nats_url, name="collect_es")
    service = await add_service(
        nc,
        name="collect_es",
        version="1.0.0",
        description="bmw async kind async:collect_es_task",
        queue_group=QUEUE_GROUP,
    )
    await service.add_endpoint(name="collect", subject=SUBJECT, handler=collect)
    log(f"collect_es service ready on {SUBJECT} (queue group {QUEUE_GROUP})")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await service.stop()
    await nc.drain()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
