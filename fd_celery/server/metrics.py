"""The server's own Prometheus metrics (``GET /metrics``), kept in this process.

The cluster's metrics (TTFT per node, queue depths, steals) are the exporter's
(``celery -A APP fd metrics``); these are what only the front door sees:

=====================================  =========  ===================  ==============================
metric                                 type       labels               meaning
=====================================  =========  ===================  ==============================
``fd_server_requests_total``           counter    endpoint, status     requests answered
``fd_server_requests_in_flight``       gauge      endpoint             requests open now
``fd_server_requests_in_flight_peak``  gauge                           most open at once since start
``fd_server_cancelled_total``          counter                         requests cancelled: the client
                                                                       left before the end
``fd_server_time_to_first_byte_s``     histogram  endpoint             request received → first
                                                                       output written
=====================================  =========  ===================  ==============================
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict

__all__ = ["ServerMetrics"]

BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.peak = 0
        self.cancelled = 0
        self._ttfb: dict[str, list[int]] = {}
        self._ttfb_sum: defaultdict[str, float] = defaultdict(float)
        self._ttfb_count: Counter[str] = Counter()

    def opened(self, endpoint: str) -> None:
        self.in_flight[endpoint] += 1
        self.peak = max(self.peak, sum(self.in_flight.values()))

    def closed(self, endpoint: str, status: int) -> None:
        self.in_flight[endpoint] -= 1
        self.requests[(endpoint, status)] += 1

    def first_byte(self, endpoint: str, seconds: float) -> None:
        buckets = self._ttfb.setdefault(endpoint, [0] * (len(BUCKETS_S) + 1))
        buckets[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self._ttfb_sum[endpoint] += seconds
        self._ttfb_count[endpoint] += 1

    def exposition(self) -> str:
        lines = [
            "# HELP fd_server_requests_total Requests answered, by endpoint and HTTP status.",
            "# TYPE fd_server_requests_total counter",
        ]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'fd_server_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        lines += [
            "# HELP fd_server_requests_in_flight Requests open now.",
            "# TYPE fd_server_requests_in_flight gauge",
        ]
        for endpoint, n in sorted(self.in_flight.items()):
            lines.append(f'fd_server_requests_in_flight{{endpoint="{endpoint}"}} {n}')
        lines += [
            "# HELP fd_server_requests_in_flight_peak Most requests open at once since the server started.",
            "# TYPE fd_server_requests_in_flight_peak gauge",
            f"fd_server_requests_in_flight_peak {self.peak}",
            "# HELP fd_server_cancelled_total Requests cancelled because their client left before the end.",
            "# TYPE fd_server_cancelled_total counter",
            f"fd_server_cancelled_total {self.cancelled}",
            "# HELP fd_server_time_to_first_byte_s Request received to first output written.",
            "# TYPE fd_server_time_to_first_byte_s histogram",
        ]
        for endpoint, buckets in sorted(self._ttfb.items()):
            total = 0
            for bound, n in zip((*BUCKETS_S, float("inf")), buckets):
                total += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(
                    f'fd_server_time_to_first_byte_s_bucket{{endpoint="{endpoint}",le="{le}"}} {total}'
                )
            lines.append(
                f'fd_server_time_to_first_byte_s_sum{{endpoint="{endpoint}"}} {self._ttfb_sum[endpoint]:.6f}'
            )
            lines.append(
                f'fd_server_time_to_first_byte_s_count{{endpoint="{endpoint}"}} {self._ttfb_count[endpoint]}'
            )
        return "\n".join(lines) + "\n"
