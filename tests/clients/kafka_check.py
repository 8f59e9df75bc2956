#!/usr/bin/env python3
"""Independent Kafka clients for Sluice's end-to-end tests.

Input is produced with kafka-python (a pure-Python protocol implementation); outputs, log end
offsets and committed group offsets are read back with confluent-kafka, and transactional
outputs with a record-batch reader of the standard library's. Every command prints one JSON
document on stdout so the Rust tests can assert on exact values.

  produce   --brokers B --topic T [--one-per-request]
                                           lines of JSON {"partition", "key", "value"[, "timestamp"]} on stdin
                                           (a timestamp of -1 is Kafka's "no timestamp"); {"produced": n}
  consume   --brokers B --topic T          every record of T: [{"partition", "offset", "key", "value", "headers"}]
  offsets   --brokers B --topic T --group G  {"<partition>": {"committed": n|null, "end": n}}
  create-topics --brokers B --topic NAME:PARTITIONS [--topic ...]
                                           {"created": [names]}
  committed --brokers B --topic T          what a read_committed consumer must see, from the raw record
                                           batches: {"records": [{"partition", "offset", "key", "value",
                                           "headers"}], "aborted": n, "open": n} (records of aborted
                                           transactions and of transactions with no marker yet)
"""

import argparse
import json
import socket
import struct
import sys
import uuid
import zlib

TIMEOUT_S = 30


def produce(args):
    from kafka import KafkaProducer

    # kafka-python 3 cannot decode the mock cluster's ApiVersions reply when probing, so the
    # protocol version is pinned (2.0 covers everything used here: idempotence-free produce).
    options = dict(bootstrap_servers=args.brokers, acks="all", linger_ms=5, api_version=(2, 0))
    if args.one_per_request:
        # For Tansu, which refuses this version's InitProducerId (v1 has no producer id field):
        # without idempotence, which records sent one at a time, each acknowledged before the
        # next, do not need.
        options.update(enable_idempotence=False, max_in_flight_requests_per_connection=1)
    producer = KafkaProducer(**options)
    futures = []
    for line in sys.stdin:
        if not line.strip():
            continue
        record = json.loads(line)
        key = record.get("key")
        futures.append(
            producer.send(
                args.topic,
                value=record["value"].encode(),
                key=key.encode() if key is not None else None,
                partition=record.get("partition"),
                timestamp_ms=record.get("timestamp"),
            )
        )
        if args.one_per_request:
            # Tansu's high watermark is its last batch's base offset + 1: one record a batch
            # keeps the log end exact.
            producer.flush(timeout=TIMEOUT_S)
    producer.flush(timeout=TIMEOUT_S)
    offsets = [future.get(timeout=TIMEOUT_S) for future in futures]
    producer.close()
    json.dump({"produced": len(offsets)}, sys.stdout)


def partitions_of(admin_like, topic):
    metadata = admin_like.list_topics(topic, timeout=TIMEOUT_S)
    return sorted(metadata.topics[topic].partitions)


def consume(args):
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": "kafka-check-" + uuid.uuid4().hex,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    remaining = {}
    assignment = []
    for partition in partitions_of(consumer, args.topic):
        low, high = consumer.get_watermark_offsets(TopicPartition(args.topic, partition), timeout=TIMEOUT_S)
        if high > low:
            remaining[partition] = high
            assignment.append(TopicPartition(args.topic, partition, low))
    consumer.assign(assignment)
    records = []
    while remaining:
        message = consumer.poll(TIMEOUT_S)
        if message is None:
            raise SystemExit(f"timed out reading {args.topic}; still waiting on {remaining}")
        if message.error():
            raise SystemExit(f"error reading {args.topic}: {message.error()}")
        key = message.key()
        records.append(
            {
                "partition": message.partition(),
                "offset": message.offset(),
                "key": key.decode() if key is not None else None,
                "value": message.value().decode() if message.value() is not None else None,
                "headers": {k: (v.decode(errors="backslashreplace") if v is not None else None) for k, v in (message.headers() or [])},
            }
        )
        if message.offset() + 1 >= remaining.get(message.partition(), 0):
            remaining.pop(message.partition(), None)
    consumer.close()
    json.dump(records, sys.stdout)


def offsets(args):
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": args.brokers, "group.id": args.group, "enable.auto.commit": False})
    partitions = [TopicPartition(args.topic, p) for p in partitions_of(consumer, args.topic)]
    committed = consumer.committed(partitions, timeout=TIMEOUT_S)
    result = {}
    for tp in committed:
        _, high = consumer.get_watermark_offsets(TopicPartition(args.topic, tp.partition), timeout=TIMEOUT_S)
        result[str(tp.partition)] = {"committed": tp.offset if tp.offset >= 0 else None, "end": high}
    consumer.close()
    json.dump(result, sys.stdout)


def create_topics(args):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": args.brokers})
    topics = []
    for spec in args.topic:
        name, partitions = spec.rsplit(":", 1)
        topics.append(NewTopic(name, int(partitions), 1))
    for future in admin.create_topics(topics, request_timeout=TIMEOUT_S).values():
        future.result(timeout=TIMEOUT_S)
    json.dump({"created": [topic.topic for topic in topics]}, sys.stdout)


def committed(args):
    """Kafka's read_committed view computed here from the raw record batches, for brokers (Tansu)
    whose Fetch carries no aborted-transactions list: a transactional data batch belongs to the
    next control batch (COMMIT or ABORT marker) of the same producer id."""
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": args.brokers}).list_topics(args.topic, timeout=TIMEOUT_S)
    topic = metadata.topics[args.topic]
    if topic.error is not None:
        raise SystemExit(f"cannot read {args.topic}: {topic.error}")
    result = {"records": [], "aborted": 0, "open": 0}
    for partition in sorted(topic.partitions):
        leader = metadata.brokers[topic.partitions[partition].leader]
        pending, records = {}, []
        for batch in raw_batches((leader.host, leader.port), args.topic, partition):
            if batch["control"] is not None:
                ended = pending.pop(batch["producer_id"], [])
                if batch["control"] == "COMMIT":
                    records.extend(ended)
                else:
                    result["aborted"] += len(ended)
            elif batch["transactional"]:
                pending.setdefault(batch["producer_id"], []).extend(batch["records"])
            else:
                records.extend(batch["records"])
        result["open"] += sum(len(open_) for open_ in pending.values())
        records.sort(key=lambda record: record["offset"])
        result["records"].extend(dict(partition=partition, **record) for record in records)
    json.dump(result, sys.stdout)


def raw_batches(address, topic, partition):
    """Every record batch of a partition, in offset order, read with Fetch v4 (read_uncommitted)
    from its leader: [{"producer_id", "transactional", "control": "COMMIT"|"ABORT"|None,
    "records": [{"offset", "key", "value", "headers"}] (none for control batches)}]."""
    batches, offset = [], 0
    with socket.create_connection(address, timeout=TIMEOUT_S) as connection:
        while True:
            high_watermark, data = fetch(connection, topic, partition, offset)
            new = [batch for batch in parse_batches(data) if batch["last_offset"] >= offset]
            if not new:
                # Tansu's high watermark is the last batch's base offset + 1, Kafka's its last
                # offset + 1: either way, nothing is left unread below it.
                if offset < high_watermark:
                    raise SystemExit(f"{topic}:{partition}: no complete batch at offset {offset} of {high_watermark}")
                return batches
            batches.extend(new)
            offset = new[-1]["last_offset"] + 1


def fetch(connection, topic, partition, offset, max_bytes=16 << 20):
    """One Fetch v4 (max_wait_ms > 0: Tansu answers a zero wait with no partitions at all);
    returns the high watermark and the record batches' bytes."""

    def string(text):
        return struct.pack(">h", len(text)) + text.encode()

    # replica_id, max_wait_ms, min_bytes, max_bytes, isolation_level (read_uncommitted)
    body = struct.pack(">iiiib", -1, 100, 0, max_bytes, 0)
    body += struct.pack(">i", 1) + string(topic) + struct.pack(">iiqi", 1, partition, offset, max_bytes)
    header = struct.pack(">hhi", 1, 4, 1) + string("kafka-check")  # Fetch, v4, correlation id, client id
    connection.sendall(struct.pack(">i", len(header) + len(body)) + header + body)
    response = receive(connection, struct.unpack(">i", receive(connection, 4))[0])
    position = 8  # correlation id, throttle_time_ms
    (topics,) = struct.unpack_from(">i", response, position)
    if topics != 1:
        raise SystemExit(f"{topic}:{partition}: Fetch answered {topics} topics")
    (name_length,) = struct.unpack_from(">h", response, position + 4)
    position += 4 + 2 + name_length + 4  # topics, name, partitions
    _, error, high_watermark, _, aborted = struct.unpack_from(">ihqqi", response, position)
    if error:
        raise SystemExit(f"{topic}:{partition}: Fetch error code {error}")
    position += 26 + 16 * max(aborted, 0)
    (length,) = struct.unpack_from(">i", response, position)
    return high_watermark, response[position + 4 : position + 4 + max(length, 0)]


def receive(connection, size):
    data = bytearray()
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise SystemExit("the broker closed the connection")
        data += chunk
    return bytes(data)


def parse_batches(data):
    """Record batches (magic 2) of a Fetch response, uncompressed or gzip; a partial batch at the
    end is left for the next Fetch."""
    batches, position = [], 0
    while position + 12 <= len(data):
        base_offset, length = struct.unpack_from(">qi", data, position)
        if position + 12 + length > len(data):
            break
        batch = data[position : position + 12 + length]
        position += 12 + length
        (magic, attributes, last_delta, producer_id, count) = struct.unpack_from(">4xb4xhi16xq6xi", batch, 12)
        if magic != 2:
            raise SystemExit(f"record batch at offset {base_offset} has magic {magic}")
        payload = batch[61:]
        codec = attributes & 7
        if codec == 1:
            payload = zlib.decompress(payload, 16 + zlib.MAX_WBITS)
        elif codec:
            raise SystemExit(f"record batch at offset {base_offset} has compression codec {codec}")
        records, at = [], 0
        for _ in range(count):
            record_length, at = varint(payload, at)
            end = at + record_length
            at += 1  # attributes
            _, at = varint(payload, at)  # timestamp delta
            offset_delta, at = varint(payload, at)
            key, at = varint_bytes(payload, at)
            value, at = varint_bytes(payload, at)
            header_count, at = varint(payload, at)
            headers = {}
            for _ in range(header_count):
                name, at = varint_bytes(payload, at)
                headers[name.decode()], at = varint_bytes(payload, at)
            records.append({"offset": base_offset + offset_delta, "key": key, "value": value, "headers": headers})
            at = end
        control = None
        if attributes & 0x20:
            # A control record's key is (version, type): type 0 aborts, 1 commits.
            control = "COMMIT" if struct.unpack(">hh", records[0]["key"])[1] == 1 else "ABORT"
            records = []
        decoded = [
            {
                "offset": r["offset"],
                "key": r["key"].decode() if r["key"] is not None else None,
                "value": r["value"].decode() if r["value"] is not None else None,
                "headers": {k: (v.decode() if v is not None else None) for k, v in r["headers"].items()},
            }
            for r in records
        ]
        batches.append(
            {
                "last_offset": base_offset + last_delta,
                "producer_id": producer_id,
                "transactional": bool(attributes & 0x10),
                "control": control,
                "records": decoded,
            }
        )
    return batches


def varint(data, at):
    """A zigzag varint and the position after it."""
    shift = value = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return (value >> 1) ^ -(value & 1), at


def varint_bytes(data, at):
    """Bytes prefixed by their varint length (-1: null) and the position after them."""
    length, at = varint(data, at)
    if length < 0:
        return None, at
    return data[at : at + length], at + length


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = {
        "produce": produce,
        "consume": consume,
        "offsets": offsets,
        "create-topics": create_topics,
        "committed": committed,
    }
    parser.add_argument("command", choices=commands)
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", required=True, action="append")
    parser.add_argument("--group")
    parser.add_argument("--one-per-request", action="store_true", help="produce: one record per Produce request")
    args = parser.parse_args()
    if args.command != "create-topics":
        if len(args.topic) != 1:
            parser.error(f"{args.command} takes one --topic")
        args.topic = args.topic[0]
    commands[args.command](args)


if __name__ == "__main__":
    main()
