"""Observability: the generated files, the alert rules under promtool, and a real Prometheus scraping
the session TorchServe (conftest.py) that evaluates every dashboard query and every rule.

The Prometheus is Debian's (2.42; ``make prometheus-tools`` puts it in .tools/ when it is not on
PATH). It scrapes the server every second with deploy/prometheus/visionpipe-rules.yml loaded; the test
sends a few seconds of good and bad requests, then asks Prometheus, through its HTTP API, for every
panel query of the dashboard JSON (GPU panels excepted, by their mark) and every rule: each must come
back with data inside the range the panel list declares.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from served import post
from serving.client import heldout_digits
from training.images import encode_png
from serving.core import StageTimes
from serving.metrics import BY_NAME, DEFAULT_BUCKETS, METRICS, HandlerMetrics, series_names
from serving.httpclient import request, wait_until_ok
from serving.server import free_port
from test_serving_core import RecordingMetrics, encode

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "visionpipe-rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "visionpipe-rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "visionpipe-dashboard.json"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


obs = _load("deploy_observability", REPO / "deploy" / "observability.py")
validate = _load("deploy_validate", REPO / "deploy" / "validate.py")


def tool(name: str) -> str:
    """prometheus / promtool: on PATH, else where `make prometheus-tools` unpacks Debian's package."""
    found = shutil.which(name) or next((str(p) for p in [REPO / ".tools/prometheus/usr/bin" / name] if p.exists()), None)
    if not found:
        pytest.fail(f"{name} not found: run `make prometheus-tools` (Debian's prometheus 2.42 into .tools/) "
                    f"or `apt-get install prometheus`", pytrace=False)
    return found


def with_bool(expr: str) -> str:
    """``a > 0.1`` -> ``a > bool 0.1`` outside label matchers and strings: an alert's condition as 0/1
    per series instead of a filter, so that a quiet alert still shows it was evaluated on data."""
    out, depth, i = [], 0, 0
    while i < len(expr):
        c = expr[i]
        if c == '"':
            j = i + 1
            while expr[j] != '"':
                j += 2 if expr[j] == "\\" else 1
            out.append(expr[i:j + 1])
            i = j + 1
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        m = re.match(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)", expr[i:]) if depth == 0 else None
        if m:
            out.append(m.group(1) + " bool")
            i += len(m.group(1))
            continue
        out.append(c)
        i += 1
    return "".join(out)


def test_with_bool():
    assert with_bool('a{le="0.05",x!="y"} > (14.4 * 0.01)\nand on (M)\nb >= 2') == \
        'a{le="0.05",x!="y"} > bool (14.4 * 0.01)\nand on (M)\nb >= bool 2'
    assert with_bool("(x or on() vector(0)) == 0") == "(x or on() vector(0)) == bool 0"


# --------------------------------------------------------------------------------------------------
# static: generated files, names, the GPU mark, the rules under promtool, the PrometheusRule schema
# --------------------------------------------------------------------------------------------------
def test_generated_files_are_current():
    stale = obs.stale()
    assert not stale, f"out of date: {stale}; regenerate: python deploy/observability.py"


def test_every_query_names_a_declared_metric():
    declared = {s for m in METRICS for s in series_names(m)}
    recorded = {r["record"] for g in obs.rule_groups() for r in g["rules"] if "record" in r}
    exprs = [t.expr for p in obs.PANELS for t in p.targets] + [r["expr"] for g in obs.rule_groups() for r in g["rules"]]
    unknown = {name for e in exprs for name in obs.metric_names(e)} - declared - recorded
    assert not unknown, f"queried but not declared in serving/metrics.py: {sorted(unknown)}"


def test_gpu_panels_read_gpu_metrics_and_only_they_do():
    for p in obs.PANELS:
        gpu_metrics = {n for t in p.targets for n in obs.metric_names(t.expr)
                       if n in BY_NAME and BY_NAME[n].gpu}
        assert bool(gpu_metrics) == p.gpu, f"panel {p.title!r}: gpu={p.gpu} but reads {gpu_metrics or 'no GPU metric'}"
    titles = [p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert [t.endswith("[GPU hosts]") for t in titles] == [p.gpu for p in obs.PANELS]


def test_latency_slo_is_a_bucket_bound_and_the_rules_count_it():
    assert obs.LATENCY_SLO_SECONDS in DEFAULT_BUCKETS
    assert 'le="0.05"' in RULES.read_text()


def test_promtool_check_rules():
    done = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in obs.rule_groups())} rules found" in done.stdout
    done = subprocess.run([tool("promtool"), "check", "config", "--syntax-only",
                           str(REPO / "deploy" / "compose" / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_test_rules_every_alert_fires_on_its_breach():
    done = subprocess.run([tool("promtool"), "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
                          timeout=120, cwd=RULES_TEST.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    alerts = {r["alert"] for g in obs.rule_groups() for r in g["rules"] if "alert" in r}
    assert alerts <= tested, f"alerts without a promtool test: {sorted(alerts - tested)}"


def test_promtool_test_rules_fails_on_a_broken_threshold(tmp_path):
    """The unit tests can fail: the fast latency page at 30x instead of 14.4x misses its breach."""
    (tmp_path / RULES.name).write_text(RULES.read_text().replace("(14.4 * 0.01)", "(30 * 0.01)"))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    done = subprocess.run([tool("promtool"), "test", "rules", RULES_TEST.name], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode != 0 and "VisionpipeLatencyBurnRate1h" in done.stdout + done.stderr


def test_prometheusrule_schema_is_strict():
    crd = yaml.safe_load((REPO / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml").read_text())
    schemas = yaml.safe_load((REPO / "deploy" / "crd-schemas.yaml").read_text())
    assert validate.validate_objects([crd], schemas) == []
    broken = json.loads(json.dumps(crd))
    alert = broken["spec"]["groups"][1]["rules"][0]
    alert["fro"] = alert.pop("for")
    broken["spec"]["groups"][0]["rules"][0]["alert"] = "BothKinds"
    problems = validate.validate_objects([broken], schemas)
    assert any("'fro' was unexpected" in p for p in problems), problems
    assert any("spec.groups.0.rules.0" in p for p in problems), problems


# --------------------------------------------------------------------------------------------------
# the handler's side, without TorchServe
# --------------------------------------------------------------------------------------------------
def test_handler_metrics_one_batch():
    rec = RecordingMetrics()
    emit = HandlerMetrics(rec, "digits")
    start = time.perf_counter() - 0.02  # a batch that took ~20 ms
    emit.batch(3, 2, start, StageTimes(1.5, 0.5, 4.0), "req-0")
    emit.batch(2, 0, time.perf_counter(), StageTimes(), "req-1")  # every request refused: no model call
    emit.rejected("not_an_image")
    emit.worker_started()
    emit.fallback("onnx-int8")
    emit.ood_baseline(0.05)
    emit.answered_images(3, 1, "req-0")   # 3 images answered, 1 flagged out of distribution
    emit.answered_images(2, None)          # a model exported without a detector
    got = {}
    for name, value, dims in rec.emitted:
        assert dims[:2] == ["digits", "Model"], dims
        got.setdefault(name, []).append(value)
    assert got["BatchSize"] == [3, 2]
    assert got["DecodeTime"] == [1.5] and got["PreprocessTime"] == [0.5] and got["InferenceTime"] == [4.0]
    assert len(got["RequestLatencySeconds"]) == 2 and all(0.02 <= v < 5 for v in got["RequestLatencySeconds"])
    assert got["RejectedInputs"] == [1] and got["WorkerStarts"] == [1]
    assert got["VariantFallbacks"] == [1] and ["digits", "Model", "onnx-int8"] in [d for n, _, d in rec.emitted
                                                                             if n == "VariantFallbacks"]
    images = [(d[2], v) for n, v, d in rec.emitted if n == "AnsweredImages"]
    assert images == [("true", 1), ("false", 2), ("unscored", 2)] and got["OodBaselineShare"] == [0.05]
    assert set(got) == {m.name for m in METRICS if m.source == "handler"}


# --------------------------------------------------------------------------------------------------
# a real Prometheus scraping the session TorchServe
# --------------------------------------------------------------------------------------------------
class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str, at: float | None = None) -> list[tuple[dict, float]]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at else {})}
        answer = request("GET", f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        doc = answer.json()
        assert answer.status == 200 and doc["status"] == "success", f"{expr}: HTTP {answer.status} {doc}"
        assert doc["data"]["resultType"] == "vector", (expr, doc["data"]["resultType"])
        return [(r["metric"], float(r["value"][1])) for r in doc["data"]["result"]]


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    """Debian's prometheus on a free port: scrapes the session TorchServe every second, rules loaded."""
    root = tmp_path_factory.mktemp("prometheus")
    target = served["metrics"].split("//", 1)[1]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": obs.JOB, "static_configs": [{"targets": [target]}]}]}
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    binary = tool("prometheus")
    # TorchServe creates Requests5XX on its first 5xx, and rate() cannot count the increment that
    # creates a series: cause one 5xx before the first scrape, so that the one in the traffic counts.
    post(served, "digits", FORM_500, "application/x-www-form-urlencoded")
    for _attempt in range(2):  # the free port can be taken before Prometheus binds it
        url = f"http://127.0.0.1:{free_port()}"
        log = open(root / "prometheus.log", "wb")
        proc = subprocess.Popen([binary, f"--config.file={root / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address={url[7:]}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_ok(url + "/-/ready", 30, alive=lambda: proc.poll() is None)  # noqa: B023 -- called here
        if proc.poll() is None:
            break
    try:
        tail = (root / "prometheus.log").read_text()[-2000:]
        assert proc.poll() is None, f"prometheus exited ({proc.returncode}):\n{tail}"
        prom = Prometheus(url)
        _until(lambda: any(v == 1 for _, v in prom.query(f'up{{job="{obs.JOB}"}}')), "prometheus scraping the server")
        # a second sample: rate() needs two, traffic must come after the first
        _until(lambda: any(v >= 2 for _, v in prom.query(f'count_over_time(up{{job="{obs.JOB}"}}[1m])')),
               "a second scrape of the server")
        yield prom
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


# TorchServe's own form decoder fails on this with a 500 before any worker sees it: the only 5xx a
# client can cause on a healthy server.
FORM_500 = b"a=%zz"


def _until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)


def _increase(prom: Prometheus, series: str, before: float, at: float | None = None) -> float:
    """The exact increase of ``series`` (summed) from the instant ``before`` to ``at``; 0 without data."""
    result = prom.query(f"sum({series} - {series} @ {before:.3f})", at)
    return result[0][1] if result else 0.0


def _traffic(served, seconds: float) -> dict:
    """Mixed traffic from 4 threads for ``seconds``: digits PNGs, cifarnet JPEGs, bad bodies, one 5xx."""
    digits = [encode_png(x) for x in heldout_digits(8, seed=7)[0]]
    from PIL import Image
    import numpy as np
    cifar = encode(Image.fromarray(np.random.default_rng(5).integers(0, 255, (32, 32, 3), np.uint8)), "JPEG")
    bad = [("digits", b"not an image at all", "image/png"), ("digits", b"", "image/png")]
    mix = [("digits", d, "image/png") for d in digits] + [("cifarnet", cifar, "image/jpeg")] * 3 + bad
    results: dict = {"latency": {"digits": [], "cifarnet": []}, "form_500": None,
                     "status": [post(served, *request)[0] for request in bad]}  # each at least once
    results["form_500"] = post(served, "digits", FORM_500, "application/x-www-form-urlencoded")[0]
    deadline = time.monotonic() + seconds

    def worker(offset: int) -> list:
        out, i = [], offset
        while time.monotonic() < deadline:
            model, body, ctype = mix[i % len(mix)]
            start = time.perf_counter()
            status = post(served, model, body, ctype)[0]
            out.append((model, status, time.perf_counter() - start))
            i += 1
        return out

    with cf.ThreadPoolExecutor(4) as pool:
        for out in pool.map(worker, range(0, 4 * 3, 3)):
            for model, status, seconds_taken in out:
                results["status"].append(status)
                if status == 200:
                    results["latency"][model].append(seconds_taken)
    return results


def _p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]


def _bound_above(seconds: float) -> float:
    return next((b for b in DEFAULT_BUCKETS if b >= seconds), math.inf)


def _driven(result: list) -> list:
    """The series of the models this test sends traffic to (not tinyq, test_hostile's queue model)."""
    return [(m, v) for m, v in result if "tinyq" not in m.values()]


@pytest.mark.slow
def test_every_dashboard_query_and_rule_returns_plausible_data(served, prometheus):
    traffic_s = 5.0
    # the last scrape before the traffic: the exact increases below are counted from it
    before = prometheus.query(f'timestamp(up{{job="{obs.JOB}"}})')[0][1]
    t0 = time.time()
    got = _traffic(served, traffic_s)
    assert got["latency"]["digits"] and got["latency"]["cifarnet"], got["status"]
    assert {400, 415} <= set(got["status"])
    # Prometheus has every answered request once the exact increases match the client's counts (the
    # handler's metrics reach the frontend through its log stream, then a scrape); then one rule
    # evaluation after that scrape.
    _until(lambda: all(_increase(prometheus, f'RequestLatencySeconds_count{{ModelName="{model}"}}', before)
                       >= len(measured) for model, measured in got["latency"].items()),
           "Prometheus counting every answered request")
    scraped = prometheus.query(f'timestamp(up{{job="{obs.JOB}"}})')[0][1]
    _until(lambda: any(v > scraped for _, v in prometheus.query("timestamp(visionpipe:latency_bad:ratio_rate5m)")),
           "a rule evaluation after the last scrape")
    at = time.time()
    window = f"{math.ceil(at - t0) + 2}s"  # the traffic and a scrape before it, nothing older

    # every panel of the dashboard JSON Grafana loads, as Grafana would send it
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert [p["title"].removesuffix(" [GPU hosts]") for p in panels] == [p.title for p in obs.PANELS]
    problems, values = [], {}
    for panel, spec in zip(panels, obs.PANELS):
        if spec.gpu:  # fed by dcgm-exporter, only on GPU hosts
            continue
        for target, t in zip(panel["targets"], spec.targets):
            # the models this test drives (the session server also serves tinyq, for test_hostile's
            # back-pressure test, which has no traffic here)
            expr = target["expr"].replace("$__rate_interval", window).replace("$model", "digits|cifarnet")
            result = prometheus.query(expr, at)
            bad = [v for _, v in result if not (t.plausible[0] <= v <= t.plausible[1])]  # NaN fails too
            if not result or bad:
                problems.append(f"{panel['title']} / {t.legend}: {result or 'no data'}\n    {expr}")
            values[(spec.title, t.legend)] = result
    assert not problems, "\n".join(problems)

    def one(title: str, legend: str, **labels) -> float:
        found = [v for m, v in values[(title, legend)] if all(m.get(k) == w for k, w in labels.items())]
        assert len(found) == 1, (title, legend, labels, values[(title, legend)])
        return found[0]

    assert one("Requests per second, by model", "{{model_name}}", model_name="digits") > 0
    assert one("Responses by status class", "4xx") > 0
    share_5xx = one("Availability: share of requests answered 5xx", "5xx share")
    assert (share_5xx > 0) == (got["form_500"] == 500), (share_5xx, got["form_500"])
    reasons = {m["Reason"] for m, v in values[("Rejected inputs by reason", "{{ModelName}} {{Reason}}")] if v > 0}
    assert {"not_an_image", "empty_body"} <= reasons
    latency_panel = "Request latency p50 / p95 / p99 (handler)"
    for model, measured in got["latency"].items():
        p50, p95, p99 = (one(latency_panel, f"{{{{ModelName}}}} p{q}", ModelName=model) for q in (50, 95, 99))
        assert 0 < p50 <= p95 <= p99, (model, p50, p95, p99)
        # The handler's time is part of each request's client time, so its p99 lies in a bucket no
        # higher than the one holding the client's p99 (within a bucket it is interpolated), and its
        # mean is below the client's. Checked on the exact increase between an instant before the
        # traffic and one after it (the @ modifier): rate() extrapolates each bucket series on its own, and with ~25
        # requests in a 10 s window that moved one request's worth of mass up a bucket (seen: p99
        # 0.97 s against a client maximum of 0.60 s).
        sel = f'{{ModelName="{model}"}}'
        exact_p99 = prometheus.query(f"histogram_quantile(0.99, sum by (le) (RequestLatencySeconds_bucket{sel}"
                                     f" - RequestLatencySeconds_bucket{sel} @ {before:.3f}))", at)[0][1]
        assert 0 < exact_p99 <= _bound_above(_p99(measured)), (model, exact_p99, sorted(measured))
        count, total = (_increase(prometheus, f"RequestLatencySeconds_{s}{sel}", before, at) for s in ("count", "sum"))
        assert count == len(measured), (model, count, len(measured))  # every 200 observed once
        assert 0 < total / count <= sum(measured) / len(measured), (model, total / count, measured)
    mean_batch = one("Batch size formed (mean, p99)", "{{ModelName}} mean", ModelName="digits")
    assert 1 <= mean_batch <= 4  # the session server's batch_size

    # every rule: evaluated by Prometheus without error, and its expression has data
    answer = request("GET", prometheus.url + "/api/v1/rules")
    assert answer.status == 200, answer
    rules = [r for g in answer.json()["data"]["groups"] for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in obs.rule_groups())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    for group in obs.rule_groups():
        for rule in group["rules"]:
            # (tinyq, served for test_hostile's back-pressure test, gets no traffic here)
            if "record" in rule:
                result = _driven(prometheus.query(rule["expr"], at))
                assert result and all(0 <= v <= 1 for _, v in result), (rule["record"], result)
            else:
                result = _driven(prometheus.query(with_bool(rule["expr"]), at))
                assert result and {v for _, v in result} <= {0, 1}, (rule["alert"], result)
                if rule["alert"] in ("VisionpipeNoTraffic", "VisionpipeWorkerRestarted"):
                    assert {v for _, v in result} == {0}, (rule["alert"], result)  # traffic, no restart
    recorded = prometheus.query("visionpipe:latency_bad:ratio_rate5m", at)
    assert {m["ModelName"] for m, _ in recorded} >= {"digits", "cifarnet"}


def _workers(served, model: str) -> list[dict]:
    """The model's workers: {"pid", "status"} from TorchServe's management API, or from the oip
    supervisor's workers.json (READY once a worker serves)."""
    if served["runtime"] == "oip":
        doc = json.loads((served["work"] / "workers.json").read_text())
        return [{"pid": w["pid"], "status": "READY" if w["ready"] else "STARTING"} for w in doc["workers"]]
    auth = {"Authorization": f"Bearer {served['management_token']}"}
    answer = request("GET", served["management"] + f"/models/{model}", headers=auth)
    assert answer.status == 200, answer
    return answer.json()[0]["workers"]


@pytest.mark.slow
def test_a_killed_worker_fires_the_restart_alert(served, prometheus):
    """The restart alert's own expression, on real data: kill one digits worker, the runtime restarts it."""
    alert = next(r for g in obs.rule_groups() for r in g["rules"] if r.get("alert") == "VisionpipeWorkerRestarted")
    assert prometheus.query(alert["expr"]) == []
    workers = _workers(served, "digits")
    assert workers and all(w["status"] == "READY" for w in workers), workers
    # A worker of the session's server, the one this module's Prometheus scrapes (a server and a
    # Prometheus of its own would add a minute per runtime to the suite). Nothing else counts restarts
    # of it across tests (test_hostile checks each test's own requests), and the end of this test
    # waits until every worker is READY again and answers.
    os.kill(int(workers[0]["pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 120
    fired: list = []
    # (an oip worker serves every model: its restart shows for each of them, not all in the same scrape)
    while not any(m["model"] == "digits" for m, _ in fired) and time.monotonic() < deadline:
        time.sleep(1)
        fired = prometheus.query(alert["expr"])
    assert any(m["model"] == "digits" and v >= 1 for m, v in fired), fired
    starts = prometheus.query('increase(WorkerStarts{ModelName="digits"}[2m])')
    assert starts and starts[0][1] >= 1, starts
    # leave the session server as it was: every digits worker ready again
    while not all(w["status"] == "READY" for w in _workers(served, "digits")) and time.monotonic() < deadline:
        time.sleep(0.5)
    status, _, _ = post(served, "digits", encode_png(heldout_digits(1)[0][0]), "image/png")
    assert status == 200
