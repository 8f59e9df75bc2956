"""The peer in Sluice's benchmark: Quix Streams doing the benchmark's ETL or word count.

Run by `sluice-bench` against the same broker and input topic as Sluice and the native
baseline. Prints one JSON line: records processed and seconds from the first record to the
last output flushed, so the consumer group's join is not counted (Sluice's and the native
baseline's start-up are not counted either).

    python3 quix_peer.py etl|wordcount BOOTSTRAP INPUT OUTPUT RECORDS OUTPUTS STATE_DIR
"""

import calendar
import json
import sys
import time

from confluent_kafka import Producer
from quixstreams import Application
from quixstreams.models.topics import admin as quix_admin
from quixstreams.models.topics.topic import TopicConfig

MARK = "<<<!>>>"
FIELDS = 15


def etl(line: bytes):
    """The seeds' ETL, as plugins/etl does it: None for a line the plugin would reject."""
    fields = line.decode().split(",")
    if len(fields) != FIELDS:
        return None
    field = [f.strip().replace(MARK, "") for f in fields]
    when = field[2]
    if len(when) != 14 or not when.isdigit():
        return None
    try:
        parsed = time.strptime(when, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    millis = calendar.timegm(parsed) * 1000
    return f"{field[1]}|{millis}|{field[3]}:{field[5]}|{field[4]}:{field[6]}|{field[13]}".encode()


def speak_to_the_mock_cluster():
    """librdkafka's mock cluster has no DescribeConfigs or CreateTopics, which Quix Streams
    uses to check and create its topics. Answer the check from metadata alone, and create
    topics the way the mock cluster does offer: auto-creation on a metadata request (with
    its default of 4 partitions, which is why the benchmark's topics have 4)."""

    def inspect_topics(self, topic_names, timeout=30):
        cluster = self.list_topics(timeout=timeout)
        return {
            name: TopicConfig(
                num_partitions=len(cluster[name].partitions),
                replication_factor=len(cluster[name].partitions[0].replicas),
                # What an unconfigured Apache Kafka broker reports.
                extra_config={"retention.ms": "604800000", "retention.bytes": "-1"},
            )
            if name in cluster
            else None
            for name in topic_names
        }

    def create_topics(self, topics, timeout=30, finalize_timeout=60):
        producer = Producer(self._config)
        for topic in topics:
            producer.list_topics(topic=topic.name, timeout=timeout)

    quix_admin.TopicAdmin.inspect_topics = inspect_topics
    quix_admin.TopicAdmin.create_topics = create_topics


def main():
    job, bootstrap, source, sink, records, outputs, state_dir = sys.argv[1:]
    records, outputs = int(records), int(outputs)
    speak_to_the_mock_cluster()
    app = Application(
        broker_address=bootstrap,
        consumer_group=f"quix-{job}-{source}",
        auto_offset_reset="earliest",
        state_dir=state_dir,
        # The mock cluster long-polls an empty fetch for fetch.wait.max.ms; keep it short as
        # the Sluice runs do.
        consumer_extra_config={"fetch.wait.max.ms": 20},
    )
    input_topic = app.topic(source, value_deserializer="bytes", key_deserializer="bytes")
    output_topic = app.topic(sink, value_serializer="bytes", key_serializer="bytes")
    first = []

    def started(value):
        if not first:
            first.append(time.perf_counter())
        return value

    sdf = app.dataframe(input_topic).apply(started)
    if job == "etl":
        sdf = sdf.apply(etl).filter(lambda value: value is not None)
    elif job == "wordcount":

        def count(word, state):
            total = state.get("count", 0) + 1
            state.set("count", total)
            return f"({word},{total})".encode()

        sdf = sdf.apply(lambda line: line.decode().split(), expand=True)
        sdf = sdf.group_by(lambda word: word, name="word")
        sdf = sdf.apply(count, stateful=True)
    else:
        sys.exit(f"unknown job {job!r}")
    sdf.to_topic(output_topic)
    app.run(count=outputs, timeout=60)
    elapsed = time.perf_counter() - first[0] if first else 0.0
    print(json.dumps({"records": records, "seconds": elapsed}))


if __name__ == "__main__":
    main()
