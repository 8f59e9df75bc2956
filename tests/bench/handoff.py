#!/usr/bin/env python3
"""State hand-off with --shared-state, measured on the embedded broker.

One host counts KEYS distinct words alone (the baseline: its in-process rate); a second host
joins, so the first publishes its state to the changelog and the second restores what it is
given (with no copy of its own); then the host holding the state partitions is killed with
SIGKILL and the other takes them over. Prints publish and restore rates and the hand-off time,
from the hosts' own log lines.

    cargo build --release -p sluice-host && python3 tests/bench/handoff.py [KEYS]
"""
import os, re, signal, subprocess, sys, tempfile, time
from confluent_kafka import Consumer, Producer, TopicPartition

KEYS = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HOST = os.path.join(ROOT, "target/release/host")
PLUGIN = os.path.join(ROOT, "target/plugins/wasm32-wasip2/release/wordcount.wasm")
RESTORED = re.compile(r"restored state partition \d+ .*\((\d+) records\) in ([\d.]+) s")
work = tempfile.mkdtemp()
hosts = {}


def start_broker(group):
    """The embedded broker with the input and the job's own topics (24 partitions each: the mock
    cluster keeps about 100k records per partition)."""
    broker = subprocess.Popen([HOST, "dev-broker", "--topic", "words:12", "--topic", f"{group}-shuffle:24",
                               "--topic", f"{group}-changelog:24"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    return broker, broker.stdout.readline().strip()


def produce_keys(brokers):
    """KEYS records, each a word of its own."""
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "batch.num.messages": 10000})
    for i in range(KEYS):
        while True:
            try:
                producer.produce("words", value=f"w{i}".encode(), partition=i % 12)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush()


def start(brokers, group, name):
    log_file = open(os.path.join(work, name + ".log"), "w")
    hosts[name] = subprocess.Popen([HOST, "run", "--plugin", PLUGIN, "--brokers", brokers, "--topic", "words",
        "--group", group, "--checkpoint", os.path.join(work, name), "--shared-state", "--instance-id", name,
        "--auto-offset-reset", "earliest", "--batch-interval", "1s", "--session-timeout", "6s",
        "--admin-address", "127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=log_file)


def log(name):
    return open(os.path.join(work, name + ".log")).read().splitlines()
def wait(what, done, limit=300):
    deadline = time.time() + limit
    while not done():
        if time.time() > deadline:
            sys.exit(f"timed out waiting for {what}; logs in {work}")
        time.sleep(0.2)
def holds_state(name):
    assigned = [line for line in log(name) if f"member {name}: assigned" in line or f"member {name}: revoked" in line]
    return bool(assigned) and "assigned" in assigned[-1] and "shuffle" in assigned[-1]

broker, brokers = start_broker("handoff")
produce_keys(brokers)
started = time.time()
start(brokers, "handoff", "a")
wait("a to count everything", lambda: any("no new records" in line for line in log("a")))
counted = time.time()
start(brokers, "handoff", "b")
wait("b to join", lambda: any("member b: assigned" in line for line in log("b")))
stable = [0, None]
def settled():  # b's assignment unchanged for 10 s
    now = sum(1 for line in log("b") if "assigned" in line or "restored" in line)
    stable[0], stable[1] = (stable[0] + 1, now) if now == stable[1] else (0, now)
    time.sleep(0.8)
    return stable[0] >= 10
wait("the group to settle", settled)
on_join = [(int(r), float(s)) for r, s in RESTORED.findall("\n".join(log("b")))]
published = re.search(r"published state partitions .* \((\d+) records in ([\d.]+) s\)", "\n".join(log("a")))

victim, survivor = ("b", "a") if holds_state("b") else ("a", "b")
before = len(log(survivor))
hosts[victim].send_signal(signal.SIGKILL)
killed = time.time()
def taken_over():
    lines = log(survivor)[before:]
    took = [i for i, line in enumerate(lines) if ": assigned " in line and "shuffle" in line]
    return took and any(" ms on " in line for line in lines[took[-1] + 1:] if "restored" not in line)
wait("the survivor to take the state over", taken_over)
handed = time.time()
after = [(int(r), float(s)) for r, s in RESTORED.findall("\n".join(log(survivor)[before:]))]
for process in list(hosts.values()) + [broker]:
    process.kill()

rate = KEYS / (counted - started)
print(f"keys: {KEYS:,}")
print(f"baseline, counting alone (in-process shuffle): {rate:,.0f} records/s ({counted - started:.1f} s with start-up)")
if published:
    n, s = int(published[1]), float(published[2])
    print(f"publish on join (host a, all its keys): {n:,} records in {s:.2f} s ({n / s:,.0f} records/s)")
for name, items in ((f"restore on join (host b, no copy of its own)", on_join),
                    (f"restore after the kill (host {survivor})", after)):
    if items:
        n, s = sum(r for r, _ in items), sum(s for _, s in items)
        print(f"{name}: {n:,} records of {len(items)} state partitions in {s:.2f} s "
              f"({n / s:,.0f} records/s, {n / s / rate:.2f} x the counting rate)")
print(f"hand-off after kill -9 of host {victim}: {handed - killed:.1f} s until host {survivor} ran a batch with its "
      f"state partitions (includes the 6 s session timeout and the rebalance)")

# The price of the two stages: the same KEYS records counted by one host alone (in-process
# shuffle) and by two hosts sharing the state (shuffle topic + changelog), each measured from
# the first record produced to the group's commits reaching the log ends (input, and for two
# hosts the shuffle too), with the hosts already in their group.
def committed_to_end(brokers, group, topic, partitions):
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": group, "enable.auto.commit": False})
    try:
        committed = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return all(c.offset == consumer.get_watermark_offsets(TopicPartition(topic, c.partition), timeout=10)[1]
                   for c in committed)
    finally:
        consumer.close()


def timed_count(group, names):
    broker, brokers = start_broker(group)
    hosts.clear()
    for name in names:
        start(brokers, group, name)
    wait("the hosts to join", lambda: all(any(f"member {n}: assigned" in l for l in log(n)) for n in names))
    time.sleep(12)  # the cooperative rounds settle
    began = time.time()
    produce_keys(brokers)
    topics = [("words", 12)] + ([(f"{group}-shuffle", 24)] if len(names) > 1 else [])
    wait("the counts", lambda: all(committed_to_end(brokers, group, t, n) for t, n in topics), limit=600)
    took = time.time() - began
    for process in list(hosts.values()) + [broker]:
        process.kill()
    return KEYS / took


alone = timed_count("alone", ["e"])
shared = timed_count("twostage", ["f", "g"])
print(f"counting {KEYS:,} new keys, hosts already running: one host alone {alone:,.0f} records/s; "
      f"two hosts through the shuffle and changelog {shared:,.0f} records/s ({shared / alone:.2f} x), on 2 cores")
