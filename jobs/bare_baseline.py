"""The benchmark's bare baseline: the least a keyed PyFlink job on the same input can do.

Reads the same event bytes through the same source (routing key computed in SQL, keyed in the JVM), counts
events in keyed state and writes ``event_id,count`` to Kafka, with exactly the Flink and Kafka settings of the
personalize job. Throughput of the full job over this one shows what Onramp's own logic costs on the same machine and day.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Iterable

from pyflink.common import Types
from pyflink.datastream import KeyedProcessFunction, RuntimeContext
from pyflink.datastream.state import ValueStateDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.config import load_config  # noqa: E402
from jobs.personalize import config_from_json, create_env, kafka_records, kafka_sink, key_by_routing_key, sink_thread  # noqa: E402
from udfs.wire_peek import read_ids  # noqa: E402

JOB_NAME = "onramp-bare-baseline"
BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())


class CountPerUser(KeyedProcessFunction):
    def open(self, runtime_context: RuntimeContext) -> None:
        self.count = runtime_context.get_state(ValueStateDescriptor("count", Types.LONG()))

    def process_element(self, record: Any, ctx: KeyedProcessFunction.Context) -> Iterable[Any]:
        n = (self.count.value() or 0) + 1
        self.count.update(n)
        try:
            event_id = read_ids(record[0])[0]
        except (IndexError, ValueError):
            event_id = b""
        yield event_id + b"," + str(n).encode()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Onramp benchmark baseline job")
    parser.add_argument("--config-json")
    parser.add_argument("--jar", action="append", default=[])
    parser.add_argument("--bounded", action="store_true")
    parser.add_argument("--job-name", default=JOB_NAME)
    args, _ = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = config_from_json(args.config_json) if args.config_json else load_config()
    env = create_env(cfg, [Path(j) for j in args.jar])
    records = kafka_records(env, cfg, bounded=args.bounded)
    # Fixed uids: generated ones hash the chaining, so sink_own_thread would otherwise orphan a savepoint's state
    counted = key_by_routing_key(records).process(CountPerUser(), output_type=BYTES).name("count").uid("count")
    sink_thread(counted, cfg).sink_to(kafka_sink(cfg, cfg.decisions_topic, "bare")).name("bare-sink").uid("bare-sink")
    env.execute(args.job_name)


if __name__ == "__main__":
    main()
