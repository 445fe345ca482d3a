#!/bin/sh
# A bmw async task in shell: removes the files of a directory older than some
# minutes. bmw runs it once per attempt of `async:cleanup` (examples/kinds.toml)
# with the payload as JSON on stdin and in BMW_PAYLOAD, e.g.
#   {"dir": "/tmp/bmw-cleanup", "older_than_minutes": 60}
# Exit 0: done (the last stdout line is logged as the task's result).
# Exit 65: the payload is wrong; bmw does not retry (the task is dead-lettered).
# Any other failure: bmw retries with its back-off.
set -eu

payload=$(cat)
field() {
    printf '%s' "$payload" | sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\{0,1\}\([^\",}]*\)\"\{0,1\}.*/\1/p"
}
dir=$(field dir)
minutes=$(field older_than_minutes)
minutes=${minutes:-60}

if [ -z "$dir" ] || [ ! -d "$dir" ]; then
    echo "task $BMW_TASK_ID: no such directory: '$dir'" >&2
    exit 65
fi
echo "task $BMW_TASK_ID attempt $BMW_ATTEMPT: cleaning $dir (older than $minutes min)"
removed=$(find "$dir" -maxdepth 1 -type f -mmin "+$minutes" -print -delete | wc -l)
echo "{\"removed\": $removed}"
