"""Step-load shape, selected by adding this file to locust's ``-f``:
``locust -f loadtest/locustfile.py,loadtest/shapes.py ...``.

Adds ``--step-users`` users every ``--step-seconds`` up to ``--users``, holds there, and stops at
``--run-time``: the knee of the throughput/latency curve shows where the server saturates.
"""

from __future__ import annotations

from locust import LoadTestShape

from loadtest.schedule import step_users


class StepLoadShape(LoadTestShape):
    use_common_options = True  # reads --users and --run-time

    def tick(self):
        opts = self.runner.environment.parsed_options
        elapsed = self.get_run_time()
        if opts.run_time and elapsed >= opts.run_time:
            return None
        users = step_users(elapsed, opts.step_users, opts.step_seconds, opts.num_users or opts.step_users)
        return users, max(1, opts.step_users)
