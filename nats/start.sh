#!/usr/bin/env bash
# Starts nats-server with JetStream in the foreground.
#   nats/start.sh                 single node (nats/single.conf), client port 4222
#   nats/start.sh cluster         the 3-node loopback cluster (nats/cluster-{1,2,3}.conf),
#                                 client ports 4222-4224; Ctrl-C stops all three
#   nats/start.sh secure          single node with bmw's users and least permissions
#                                 (nats/secure.conf: single.conf + permissions.conf);
#                                 needs BMW_{WORKER,BRIDGE,TASK,PRODUCER}_PASSWORD set
# Data goes under ${BMW_NATS_DATA:-.bmw/nats}.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$("$here/install.sh")"
data="${BMW_NATS_DATA:-.bmw/nats}"
mode="${1:-single}"
case "$mode" in
  single)
    mkdir -p "$data/single"
    exec "$bin" -c "$here/single.conf" --store_dir "$data/single"
    ;;
  secure)
    mkdir -p "$data/single"
    exec "$bin" -c "$here/secure.conf" --store_dir "$data/single"
    ;;
  cluster)
    pids=()
    for n in 1 2 3; do
      mkdir -p "$data/n$n"
      "$bin" -c "$here/cluster-$n.conf" --store_dir "$data/n$n" &
      pids+=($!)
    done
    trap 'kill "${pids[@]}" 2>/dev/null; wait' INT TERM EXIT
    wait
    ;;
  *) echo "usage: $0 [single|cluster|secure]" >&2; exit 2 ;;
esac
