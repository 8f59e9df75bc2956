#!/usr/bin/env python3
"""Independent Kafka clients for Sluice's end-to-end tests.

Input is produced with kafka-python (a pure-Python protocol implementation); outputs, log end
offsets and committed group offsets are read back with confluent-kafka. Every command prints
one JSON document on stdout so the Rust tests can assert on exact values.

  produce   --brokers B --topic T          lines of JSON {"partition", "key", "value"[, "timestamp"]} on stdin
                                           (a timestamp of -1 is Kafka's "no timestamp")
  consume   --brokers B --topic T          every record of T: [{"partition", "offset", "key", "value", "headers"}]
  offsets   --brokers B --topic T --group G  {"<partition>": {"committed": n|null, "end": n}}
"""

import argparse
import json
import sys
import uuid

TIMEOUT_S = 30


def produce(args):
    from kafka import KafkaProducer

    # kafka-python 3 cannot decode the mock cluster's ApiVersions reply when probing, so the
    # protocol version is pinned (2.0 covers everything used here: idempotence-free produce).
    producer = KafkaProducer(bootstrap_servers=args.brokers, acks="all", linger_ms=5, api_version=(2, 0))
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
                "headers": {k: (v.decode() if v is not None else None) for k, v in (message.headers() or [])},
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["produce", "consume", "offsets"])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group")
    args = parser.parse_args()
    {"produce": produce, "consume": consume, "offsets": offsets}[args.command](args)


if __name__ == "__main__":
    main()
