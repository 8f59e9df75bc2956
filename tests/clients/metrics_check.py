#!/usr/bin/env python3
"""Scrapes a Sluice job's /metrics and parses it with Prometheus' own Python client (its
OpenMetrics parser, which also checks the exposition's syntax: a malformed line fails here).

  metrics_check.py URL   prints {"<family>": {"type": t, "samples": [{"name", "labels", "value"}]}}
"""

import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main():
    with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
        content_type = response.headers.get("Content-Type", "")
        text = response.read().decode("utf-8")
    if not content_type.startswith("application/openmetrics-text"):
        sys.exit(f"unexpected content type {content_type!r}")
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {
            "type": family.type,
            "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in family.samples],
        }
    json.dump(families, sys.stdout)


if __name__ == "__main__":
    main()
