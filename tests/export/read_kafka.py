"""Consumes every clearhouse topic from the beginning with confluent-kafka (librdkafka, a
third-party client) and prints, as JSON, per topic the records in offset order:
[partition, offset, key, clearhouse-seq, clearhouse-hash, clearhouse-kind, value].

    python read_kafka.py BOOTSTRAP TOPIC_PREFIX
"""
import json
import sys
import time

from confluent_kafka import Consumer, TopicPartition

KINDS = ["payment_settled", "payment_rejected", "payment_returned", "liquidity",
         "window_closed", "fund_adjustment", "window_settled"]


def main(bootstrap, prefix):
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "clearhouse-test-reader",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "broker.address.family": "v4",
    })
    out = {f"{prefix}.{kind}": [] for kind in KINDS}
    deadline = time.time() + 120
    assignment = []
    for topic in out:
        metadata = consumer.list_topics(topic, timeout=10)
        assignment += [TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions]
    # Read until nothing more comes for 3 s: tansu 0.6 reports the high watermark of a
    # partition as the base offset of its last batch + 1, so watermarks cannot bound this.
    consumer.assign(assignment)
    idle_since = time.time()
    while time.time() - idle_since < 3:
        if time.time() > deadline:
            raise SystemExit("still reading after 120 s")
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error():
            raise SystemExit(f"{message.topic()}: {message.error()}")
        idle_since = time.time()
        headers = {k: v.decode() for k, v in (message.headers() or [])}
        out[message.topic()].append([
            message.partition(), message.offset(), message.key().decode(),
            int(headers["clearhouse-seq"]), headers["clearhouse-hash"],
            headers["clearhouse-kind"], message.value().decode()])
    for records in out.values():
        records.sort(key=lambda r: (r[0], r[1]))
    consumer.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
