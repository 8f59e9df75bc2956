#!/usr/bin/env bash
# State hand-off with --shared-state, measured: one host counts KEYS distinct words alone (the
# baseline: its in-process rate), a second host joins (the first publishes its state to the
# changelog and the second restores half of it), then the first is killed (the second restores
# the rest). Prints the restore rates and hand-off times from the hosts' own log lines.
#
#   cargo build --release -p sluice-host && tests/bench/handoff.sh [KEYS]
#
# Needs python3 with confluent-kafka (the test command installs it).
set -euo pipefail
keys=${1:-1000000}
root=$(cd "$(dirname "$0")/../.." && pwd)
host=$root/target/release/host
plugin=$(ls "$root"/target/plugins/wasm32-wasip2/release/wordcount.wasm)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT

"$host" dev-broker --topic words:12 --topic handoff-shuffle:6 --topic handoff-changelog:6 \
    >"$work/broker" 2>/dev/null &
until grep -q '^127.0.0.1:' "$work/broker" 2>/dev/null; do sleep 0.1; done
brokers=$(head -1 "$work/broker")

python3 - "$brokers" "$keys" <<'EOF'
import sys
from confluent_kafka import Producer
brokers, keys = sys.argv[1], int(sys.argv[2])
producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "batch.num.messages": 10000})
for i in range(keys):
    while True:
        try:
            producer.produce("words", value=f"w{i}".encode(), partition=i % 12)
            break
        except BufferError:
            producer.poll(0.05)
producer.flush()
EOF

run() {
    "$host" run --plugin "$plugin" --brokers "$brokers" --topic words --group handoff \
        --checkpoint "$work/$1" --shared-state --instance-id "$1" --auto-offset-reset earliest \
        --batch-interval 1s --session-timeout 6s --admin-address 127.0.0.1:0 >"$work/$1.log" 2>&1 &
    echo $!
}
seconds() { date +%s.%N; }
wait_for() { until grep -q "$2" "$work/$1.log"; do sleep 0.2; done; }

started=$(seconds)
first=$(run a)
# Caught up: a batch after the first that read nothing.
until [ "$(grep -c 'no new records' "$work/a.log")" -ge 1 ]; do sleep 0.2; done
counted=$(seconds)
second=$(run b)
wait_for b 'member b: assigned'
# The group settled: b ran batches with what it was given.
until [ "$(grep -c 'batch .* on b' "$work/b.log")" -ge 3 ]; do sleep 0.2; done
on_join=$(grep -c 'restored state partition' "$work/b.log" || true)
kill -9 "$first"
killed=$(seconds)
until [ "$(grep -c 'restored state partition' "$work/b.log")" -ge 6 ]; do sleep 0.2; done
restored=$(seconds)
kill "$second"

python3 - "$keys" "$started" "$counted" "$killed" "$restored" "$work/a.log" "$work/b.log" "$on_join" <<'EOF'
import re, sys
keys, started, counted, killed, restored = int(sys.argv[1]), *map(float, sys.argv[2:6])
a, b = open(sys.argv[6]).read(), open(sys.argv[7]).read()
on_join = int(sys.argv[8])
published = re.search(r"published state partitions .* \((\d+) records in ([\d.]+) s\)", a)
restores = [(int(r), float(s)) for r, s in re.findall(r"restored state partition \d+ .*\((\d+) records\) in ([\d.]+) s", b)]
join, rest = restores[:on_join], restores[on_join:]
def rate(items):
    records, secs = sum(r for r, _ in items), sum(s for _, s in items)
    return records, secs, records / secs if secs else float("nan")
print(f"keys: {keys}")
print(f"baseline, counting alone (in-process shuffle): {keys / (counted - started):,.0f} records/s "
      f"({counted - started:.1f} s including start-up)")
if published:
    print(f"publish on join: {int(published[1]):,} records in {float(published[2]):.2f} s "
          f"({int(published[1]) / float(published[2]):,.0f} records/s)")
for name, items in (("restore on join", join), ("restore after the kill", rest)):
    if not items:
        continue
    records, secs, per_second = rate(items)
    print(f"{name}: {records:,} records in {secs:.2f} s ({per_second:,.0f} records/s, "
          f"{per_second / (keys / (counted - started)):.2f} x the counting rate)")
print(f"hand-off after kill -9: {restored - killed:.1f} s until every state partition was restored "
      f"(includes the 6 s session timeout and the group's rebalance)")
EOF
