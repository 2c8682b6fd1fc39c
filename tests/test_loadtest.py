"""Load-test suite: SLO gate logic and request builders (unit), the soak/fault analysis on synthetic
records, the background load that soak, fault and attack drive (against an in-process server), and a
short real locust run against a real TorchServe serving the digits model (slow)."""

from __future__ import annotations

import email.parser
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loadtest.gates import Thresholds, Totals, check_gates, format_summary, gate_report
from loadtest.bodies import b64_batch_body, malformed_request, multipart_body, predictions_in
from loadtest.images import load_pool, synthetic_pixels
from loadtest.openloop import BackgroundLoad, Records, Target, Window, arrival_chunks
from training.images import encode_png
from loadtest.schedule import step_users
from training.contract import Contract

REPO = Path(__file__).resolve().parents[1]


def totals(requests=1000, failures=0, p95=80.0, p99=150.0) -> Totals:
    return Totals(requests=requests, failures=failures, p50_ms=20.0, p95_ms=p95, p99_ms=p99, rps=100.0)


# ---- gates ---------------------------------------------------------------------------------------
def test_gates_pass_within_every_threshold():
    assert check_gates(totals(failures=10), Thresholds(p95_ms=100, p99_ms=200, max_error_rate=0.01)) == []


@pytest.mark.parametrize("run, broken", [
    (totals(failures=11), "error rate 1.10% (11/1000) > max 1.00%"),
    (totals(p95=101), "p95 101 ms > 100 ms"),
    (totals(p99=201), "p99 201 ms > 200 ms"),
])
def test_each_broken_threshold_is_named(run, broken):
    assert check_gates(run, Thresholds(p95_ms=100, p99_ms=200, max_error_rate=0.01)) == [broken]


def test_no_requests_fails_the_gate():
    broken = check_gates(totals(requests=0, failures=0), Thresholds())
    assert len(broken) == 1 and "no request completed" in broken[0]


def test_gate_report_records_verdict_and_prints_failure():
    report = gate_report(totals(p99=900), Thresholds(p99_ms=500))
    assert report["passed"] is False and report["totals"]["p99_ms"] == 900
    json.dumps(report)  # JSON-able
    assert "FAIL" in format_summary(report) and "p99 900 ms > 500 ms" in format_summary(report)


@pytest.mark.parametrize("kwargs", [{"p95_ms": 0}, {"p99_ms": -1}, {"max_error_rate": 1.5}])
def test_thresholds_reject_nonsense(kwargs):
    with pytest.raises(ValueError):
        Thresholds(**kwargs)


def test_addresses_default_to_make_serves_config():
    """Without --host, make serve's inference address; without --management-url, the --host's host on
    the management port of serving/config.properties (make loadtest passes neither unless told). In a
    subprocess: importing locust monkey-patches the interpreter."""
    from serving.server import DEFAULT_CONFIG, read_properties

    code = ("from types import SimpleNamespace as E; from loadtest import locustfile as l; "
            "print(l.ServedUser.host, l._management_url(E(parsed_options=None, host=None)), "
            "l._management_url(E(parsed_options=None, host='http://10.1.2.3:9000')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    props = read_properties(DEFAULT_CONFIG)
    port = props["management_address"].rsplit(":", 1)[1]
    assert done.stdout.split() == [props["inference_address"], props["management_address"], f"http://10.1.2.3:{port}"]


def test_step_shape_adds_users_per_period_up_to_the_cap():
    assert [step_users(t, 4, 10, 16) for t in (0, 9.9, 10, 25, 60)] == [4, 4, 8, 12, 16]


# ---- images and request bodies -------------------------------------------------------------------
def test_digits_pool_is_the_held_out_split_as_png():
    pool = load_pool("digits", limit=8)
    assert len(pool) == 8 and all(y is not None for y in pool.labels) and "held-out" in pool.source
    img = Image.open(__import__("io").BytesIO(pool.images[0]))
    assert img.format == "PNG" and img.size == (28, 28) and img.mode == "L"


def test_cifarnet_without_data_is_synthesised_in_the_contract_shape_and_says_so(tmp_path):
    contract = Contract(32, 32, 3, (0.5,) * 3, (0.25,) * 3, tuple("abcdefghij"))
    (tmp_path / "artifacts" / "cifarnet").mkdir(parents=True)
    (tmp_path / "artifacts" / "cifarnet" / "manifest.json").write_text(json.dumps(
        {"contract": contract.to_dict(), "source": {"dataset": "cifar10"}}))
    pool = load_pool("cifarnet", data_dir=tmp_path / "no-cifar-here", limit=4,
                     artifacts_dir=tmp_path / "artifacts")
    assert pool.source.startswith("SYNTHESISED") and pool.labels == (None,) * 4
    img = Image.open(__import__("io").BytesIO(pool.images[0]))
    assert img.size == (32, 32) and img.mode == "RGB"


def test_cifarnet_reads_the_real_test_batch_when_given(tiny_cifar_dir, cifar_checkpoint):
    # the dataset comes from the run's checkpoint (no manifest here), not from its name
    pool = load_pool("cifarnet", data_dir=tiny_cifar_dir, limit=5, artifacts_dir=tiny_cifar_dir,
                     runs_dir=cifar_checkpoint.parent.parent)
    assert "held-out" in pool.source and len(pool) == 5 and None not in pool.labels
    with pytest.raises(FileNotFoundError, match="nothing says what run 'cifarnet' was trained on"):
        load_pool("cifarnet", data_dir=tiny_cifar_dir, limit=5, artifacts_dir=tiny_cifar_dir,
                  runs_dir=tiny_cifar_dir)


def test_multipart_body_parses_back_to_the_image():
    png = encode_png(synthetic_pixels(Contract(8, 8, 1, (0.5,), (0.5,), ("a", "b")), 1)[0])
    body, ctype = multipart_body(png)
    msg = email.parser.BytesParser().parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
    (part,) = msg.get_payload()
    assert part.get_param("name", header="content-disposition") == "data"
    assert part.get_payload(decode=True) == png


def test_b64_batch_body_holds_every_image():
    doc = json.loads(b64_batch_body([b"one", b"two", b"three"]))
    assert [__import__("base64").b64decode(i["b64"]) for i in doc["instances"]] == [b"one", b"two", b"three"]


def test_malformed_requests_cover_every_kind_and_are_not_valid_images():
    rng, png = random.Random(0), encode_png(np.zeros((1, 8, 8), np.uint8))
    kinds = {malformed_request(rng, png)[0] for _ in range(200)}
    assert kinds == {"not-an-image", "truncated-png", "bad-base64", "empty-instances", "empty-body"}


@pytest.mark.parametrize("body, n", [
    (b'{"predictions": [[{"label": "3"}], [{"label": "5"}]]}', 2),
    (b'[{"a": 1}, {"a": 2}, {"a": 3}]', 3),
    (b'{"3": 0.9}', 1),
    (b"<html>", None),
])
def test_predictions_in_counts_answers(body, n):
    assert predictions_in(body) == n


# ---- smoke: locust against a real TorchServe serving the tiny digits model (conftest.digits_server) -
def run_locust(server, out: Path, seconds: int, *extra: str) -> subprocess.CompletedProcess:
    """locust with default arguments: it asks the server what it serves (its management API)."""
    url, mgmt = server.url, server.management_url
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"), "--headless",
           "--host", url, "--users", "4", "--spawn-rate", "4", "--run-time", f"{seconds}s", "--only-summary",
           "--csv", str(out / "lt"), "--html", str(out / "lt.html"), "--json-file", str(out / "lt"),
           "--gate-file", str(out / "gate.json"), "--management-url", mgmt, *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_locust_smoke_passes_gates_and_every_request_form_is_answered(digits_server, tmp_path):
    # Latency gates are loose on purpose: this checks the plumbing, speed lives in bench/.
    proc = run_locust(digits_server, tmp_path, 6, "--malformed-share", "0.15",
                      "--p95-ms", "20000", "--p99-ms", "30000", "--max-error-rate", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gate.json").read_text())
    assert report["passed"] and report["totals"]["failures"] == 0
    by_name = report["requests_by_name"]
    for form in ("digits raw", "digits multipart", "digits b64x4", "digits malformed"):
        assert by_name[form]["requests"] > 0 and by_name[form]["failures"] == 0, by_name
    assert "held-out" in report["image_sources"]["digits"]
    for f in ("lt_stats.csv", "lt.html", "lt.json"):
        assert (tmp_path / f).stat().st_size > 0
    assert "gates:" in proc.stderr and "PASS" in proc.stderr


@pytest.mark.slow
def test_locust_exits_nonzero_when_a_gate_breaks(digits_server, tmp_path):
    # locust counts --run-time from its own start, before our init hook has loaded the image pools
    # (~2.5 s for 256 held-out digits): 2 s could end before the first request.
    proc = run_locust(digits_server, tmp_path, 6, "--p99-ms", "0.001")
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gate.json").read_text())
    assert not report["passed"] and any(v.startswith("p99") for v in report["violations"]), proc.stderr[-3000:]


# ---- soak / fault analysis on synthetic records -------------------------------------------------
def records(rows) -> Records:
    """(intended s, latency ms, status) rows -> the records a background load keeps."""
    a = np.array(rows, dtype=float).reshape(-1, 3)
    return Records(a[:, 0], a[:, 0] + a[:, 1] / 1e3, a[:, 2].astype(int), np.zeros(len(a), int))


def test_windows_count_by_intended_time_and_take_percentiles_of_the_successes():
    recs = records([(t / 10, t % 10 + 1, 200) for t in range(100)] + [(5.5, 10_000, 0)])
    w = recs.window(0, 10)
    assert (w.requests, w.errors, w.rps) == (101, 1, 10.0)
    # HdrHistogram's nearest rank, to its 3 significant digits; the failed request's 10 s is not counted
    assert w.p50_ms == pytest.approx(5.0, rel=1e-3) and w.p99_ms == pytest.approx(10.0, rel=1e-3)
    assert [x.requests for x in recs.windows(0, 10, 5)] == [50, 51]
    assert [x.errors for x in recs.windows(0, 10, 5)] == [0, 1]
    # A request that left at 4.9 s and was answered at 5.1 s counts as a request of the first window and
    # as throughput of the second.
    late = records([(4.9, 200, 200)])
    assert (late.window(0, 5).requests, late.window(0, 5).rps) == (1, 0.0)
    assert (late.window(5, 10).requests, late.window(5, 10).rps) == (0, 0.2)


def test_window_percentiles_are_the_nearest_rank_not_one_rank_high():
    w = records([(i / 100, i, 200) for i in range(1, 101)]).window(0, 2)
    assert w.p99_ms == pytest.approx(99.0, rel=1e-3) and w.p50_ms == pytest.approx(50.0, rel=1e-3)
    assert records([]).window(0, 1) == Window(0, 1, 0, 0, 0.0, 0.0, 0.0)


def test_recovery_is_the_first_clean_window_back_near_baseline():
    from loadtest.resilience import recovery_s

    # 100 req/s before t=10; errors and half rate until t=14; full rate again after.
    recs = records([(t / 100, 5, 200) for t in range(1000)]
                   + [(10 + t / 50, 5, 0 if t < 20 else 200) for t in range(200)]
                   + [(14 + t / 100, 5, 200) for t in range(1000)])
    assert recovery_s(recs, 10.0, baseline_rps=100.0) == pytest.approx(5.5)  # [13.5, 15.5): 87.5 req/s
    assert recovery_s(records([(11, 1, 0)]), 10.0, 100.0, horizon=5) is None


def test_statuses_count_the_requests_of_a_window_by_answer():
    from loadtest.resilience import statuses

    recs = records([(0.5, 1, 200), (1.5, 1, 503), (1.6, 1, 503), (1.7, 1, 0), (2.5, 1, 200), (2.6, 1, 413)])
    assert statuses(recs) == {"0": 1, "200": 2, "413": 1, "503": 2}
    assert statuses(recs, 1, 2) == {"0": 1, "503": 2} and statuses(recs, 2, 3, failed=True) == {"413": 1}
    assert statuses(records([])) == {}


def test_rss_growth_after_warmup_and_p99_stability():
    from loadtest.resilience import p99_stable, rss_growth
    assert rss_growth([(0, 100.0), (60, 200.0), (600, 210.0)], warmup_s=60) == pytest.approx(0.05)
    assert rss_growth([(0, 100.0)], warmup_s=0) is None

    def ws(p99s):
        return [Window(i, i + 1, 10, 0, 10.0, 1.0, p) for i, p in enumerate(p99s)]
    assert p99_stable(ws([10, 11, 10, 12, 10, 11])) and not p99_stable(ws([10, 10, 10, 30, 30, 30]))


def test_the_attack_passes_on_fast_refusals_and_recovery_not_on_silence_or_lasting_errors():
    from loadtest.resilience import attack_passed

    ok_after, bad_after = Window(0, 5, 50, 0, 10.0, 5.0, 9.0), Window(0, 5, 50, 2, 10.0, 5.0, 9.0)
    attackers = np.array([200, 413, 503])
    assert attack_passed({"503": 900}, ok_after, False, attackers, 200)
    assert attack_passed({}, ok_after, False, attackers, 200)
    assert not attack_passed({"503": 900, "0": 1}, ok_after, False, attackers, 200)  # one left unanswered
    assert not attack_passed({"500": 1}, ok_after, False, attackers, 200)
    assert not attack_passed({"503": 9}, bad_after, False, attackers, 200)  # errors after the attack
    assert not attack_passed({}, Window(0, 5, 0, 0, 0.0, 0.0, 0.0), False, attackers, 200)  # nothing measured
    assert not attack_passed({}, ok_after, True, attackers, 200)  # a worker died
    assert not attack_passed({}, ok_after, False, np.array([200, 500]), 200)
    assert not attack_passed({}, ok_after, False, attackers, 5000)  # a large error body


def test_reports_name_the_machine_and_its_load():
    from loadtest.resilience import fault_section, machine_line

    r = {"machine": "Some CPU (2 logical CPUs; avx2)", "load_before": 0.5, "load_after": 1.25}
    assert machine_line(r) == "Some CPU (2 logical CPUs; avx2); 1-min load average 0.50 before the run, 1.25 after"
    r |= {"run": "digits", "target_rps": 10.0, "max_rps": 20.0, "passed": True, "after_s": 20,
          "kill_worker": {"workers": 2, "failed_requests": 0, "failed_by_status": {}, "requests_after": 200,
                          "worker_ready_s": 3.0,
                          "baseline_rps": 10.0, "throughput_recovered_s": None},
          "over_limit": {"max_request_size": 10, "body_status": 413, "body_answer": "{}", "others_errors": 0,
                         "others_requests": 30, "pixels_status": 400, "pixels_answer": "{}"},
          "restart": {"stop_s": 1.0, "ready_after_start_s": 5.0, "clients_first_success_after_stop_s": 7.0,
                      "failed_while_down": 70}}
    text = fault_section(r, "python -m loadtest.resilience fault")
    assert machine_line(r) in text and "noisy" not in text and "after never s" in text


def test_target_gives_each_body_its_content_type():
    t = Target.post("http://127.0.0.1:8080/p", [b"{}", b"\x89PNG"],
                    content_type=lambda b: "application/json" if b[:1] == b"{" else "image/png")
    heads = [r.partition(b"\r\n\r\n")[0] for r in t.requests]
    assert b"Content-Type: application/json" in heads[0] and b"Content-Type: image/png" in heads[1]
    assert all(h.count(b"Content-Type") == 1 for h in heads)


# ---- the load under soak, fault and attack: open loop in the background, every request kept -------
def until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met within the deadline"
        time.sleep(0.01)


def test_arrival_chunks_join_into_one_schedule():
    chunks = arrival_chunks(100.0, "constant", chunk_s=0.5)
    t = np.concatenate([next(chunks) for _ in range(4)])
    assert len(t) == 200 and np.allclose(np.diff(t), 0.01)  # no gap or overlap at the joins
    chunks = arrival_chunks(400.0, "poisson", seed=2, chunk_s=1.0)
    t = np.concatenate([next(chunks) for _ in range(10)])
    assert np.all(np.diff(t) > 0) and abs(len(t) - 4000) < 4 * np.sqrt(4000)


def test_background_open_loop_sends_its_schedule_and_records_every_answer():
    from loadtest.stall_server import StallServer

    with StallServer(stall_s=0.0) as server:
        load = BackgroundLoad(Target.post(server.url, [b"x" * 100]), rate_rps=200, arrivals="constant").start()
        until(lambda: len(load.records()) >= 60)
        records = load.stop()
    n = len(records)
    assert n >= 60 and np.allclose(np.sort(records.intended), np.arange(n) / 200)  # the schedule, exactly
    assert records.ok.all() and (records.size == len(b'{"ok": true}')).all()
    assert (records.done >= records.intended).all()
    r = load.result
    assert r is not None and r.mode == "open" and r.sent == r.ok == n and r.errors == 0


def test_background_closed_loop_keeps_exactly_its_connections_in_flight():
    from loadtest.stall_server import StallServer

    with StallServer(stall_s=0.0) as server:
        load = BackgroundLoad(Target.post(server.url, [b"x"]), connections=3).start()
        until(lambda: len(load.records()) >= 300)
        records = load.stop()
    # In flight over time: +1 at each send, -1 at each answer (an answer frees its slot before the resend).
    events = sorted([(t, 1) for t in records.intended] + [(t, -1) for t in records.done])
    assert max(np.cumsum([d for _, d in events])) == 3
    assert load.result is not None and load.result.connections == 3 and records.ok.all()


def test_wait_answered_returns_once_every_earlier_request_has_its_answer():
    from loadtest.stall_server import StallServer

    # Stalled 0.5 s of every 0.51: at any moment some requests wait for the stall to end.
    with StallServer(stall_s=0.5, period_s=0.51) as server:
        load = BackgroundLoad(Target.post(server.url, [b"x"]), rate_rps=100).start()
        until(lambda: len(load.records()) >= 10)  # just after a stall ended
        cut = load.now() + 0.1  # within the next stall: requests before it wait for its end
        seen = load.wait_answered(cut)
        until(lambda: load.now() > cut + 0.6)  # the load goes on past that stall's end
        final = load.stop()
    assert np.count_nonzero(seen.intended < cut) == np.count_nonzero(final.intended < cut) > 0


def test_background_load_against_nothing_records_every_request_as_failed():
    from serving.server import free_port

    load = BackgroundLoad(Target.post(f"http://127.0.0.1:{free_port()}/", [b"x"]), rate_rps=100,
                          timeout_s=1.0).start()
    until(lambda: len(load.records()) >= 10)
    records = load.stop()
    assert len(records) > 0 and not records.ok.any() and (records.status == 0).all()
    assert load.result is not None and load.result.errors == len(records) and load.result.ok == 0


def test_background_load_refuses_both_or_neither_mode():
    target = Target.post("http://127.0.0.1:9/", [b"x"])
    for kwargs in ({}, {"rate_rps": 1.0, "connections": 1}, {"rate_rps": 0.0}, {"connections": 0}):
        with pytest.raises(ValueError):
            BackgroundLoad(target, **kwargs)


@pytest.mark.parametrize("text, expected", [("600", 600.0), ("600s", 600.0), ("10m", 600.0),
                                            ("1h30m", 5400.0), ("2.5", 2.5)])
def test_soak_duration_reads_locust_spellings(text, expected):
    from loadtest.resilience import seconds

    assert seconds(text) == expected


@pytest.mark.parametrize("text", ["", "5x", "m", "10m5", "0s"])
def test_soak_duration_refuses_nonsense(text):
    import argparse

    from loadtest.resilience import seconds

    with pytest.raises(argparse.ArgumentTypeError, match="bad duration"):
        seconds(text)


def test_publish_report_writes_reports_plot_and_docs_section(tmp_path):
    from loadtest.docs import publish_report

    reports, docs = tmp_path / "reports", tmp_path / "docs" / "benchmarks.md"
    reports.mkdir()
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n")
    (reports / "x.png").write_bytes(b"png")
    publish_report(reports, "x", {"a": 1}, "## X\nrow", docs, "x-key")
    assert json.loads((reports / "x.json").read_text()) == {"a": 1}
    assert (reports / "x.md").read_text() == "## X\nrow" and (docs.parent / "x.png").read_bytes() == b"png"
    publish_report(reports, "x", {"a": 2}, "## X\nnew", docs, "x-key")  # a rerun replaces its section
    text = docs.read_text()
    assert text.count("<!-- x-key:begin -->") == 1 and "new" in text and "row" not in text
