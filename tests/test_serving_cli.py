"""Unit tests of the archive settings, config rendering and the CLI's error exits (no TorchServe)."""

from __future__ import annotations

import json
import re
from pathlib import Path
import os
import time

import pytest

from serving.__main__ import main
from serving.archive import ArchiveConfig, chosen_variants, model_config, needs_archive
from serving.server import (DEFAULT_CONFIG, REPO, Server, curl_examples, management_url_for, read_key, read_properties,
                            render_config)

MANIFEST = {"default_variant": {"cpu": "onnx-int8", "cuda": "torchscript-fp32"},
            "variants": {"onnx-int8": {}, "torchscript-fp32": {}, "onnx-fp32": {}}}


def test_chosen_variants_and_model_config():
    cfg = ArchiveConfig(run="digits")
    assert chosen_variants(MANIFEST, cfg) == ("onnx-int8", "torchscript-fp32")
    cfg = ArchiveConfig(run="digits", variant_cpu="onnx-fp32", threads=2, batch_size=16)
    cpu, cuda = chosen_variants(MANIFEST, cfg)
    mc = model_config(cfg, cpu, cuda)
    assert (mc["batchSize"], mc["handler"]["threads"], mc["handler"]["variant_cpu"]) == (16, 2, "onnx-fp32")
    assert set(mc) == {"minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout",
                       "jobQueueSize", "handler"}
    with pytest.raises(ValueError, match="not in"):
        chosen_variants({**MANIFEST, "variants": {"onnx-int8": {}}}, ArchiveConfig(run="d", variant_cpu="onnx-fp32"))
    with pytest.raises(ValueError, match="not one of"):
        ArchiveConfig(run="d", variant_cpu="onnx-fp16")
    with pytest.raises(ValueError, match="min_workers"):
        ArchiveConfig(run="d", min_workers=2, max_workers=1)


def test_needs_archive_follows_the_manifest(tmp_path):
    art, mar = tmp_path / "digits", tmp_path / "digits.mar"
    assert not needs_archive(art, mar)  # nothing exported
    art.mkdir()
    (art / "manifest.json").write_text("{}")
    assert needs_archive(art, mar)  # exported, not archived
    mar.write_bytes(b"x")
    assert not needs_archive(art, mar)
    later = time.time() + 5
    os.utime(art / "manifest.json", (later, later))  # re-exported after archiving
    assert needs_archive(art, mar)


def test_the_management_url_beside_an_inference_url_takes_the_configs_port(tmp_path):
    render_config(DEFAULT_CONFIG, tmp_path / "c.properties", {"management_address": "http://127.0.0.1:9191"})
    assert management_url_for("http://10.0.0.5:8080/predictions/x", tmp_path / "c.properties") == "http://10.0.0.5:9191"
    port = read_properties(DEFAULT_CONFIG)["management_address"].rsplit(":", 1)[1]
    assert management_url_for("127.0.0.1:18080") == f"http://127.0.0.1:{port}"


def test_render_config_makes_paths_absolute_and_applies_overrides(tmp_path):
    props = render_config(DEFAULT_CONFIG, tmp_path / "c.properties",
                          {"inference_address": "http://127.0.0.1:1234"})
    written = read_properties(tmp_path / "c.properties")
    assert written == props and written["inference_address"] == "http://127.0.0.1:1234"
    assert os.path.isabs(written["metrics_config"]) and os.path.isfile(written["metrics_config"])
    log4j = written["vmargs"].split("-Dlog4j.configurationFile=")[1].split()[0]
    assert os.path.isabs(log4j) and os.path.isfile(log4j)
    # the shipped settings the README promises
    base = read_properties(DEFAULT_CONFIG)
    assert base["enable_model_api"] == "false" and base["metrics_mode"] == "prometheus"
    assert base["management_address"].startswith("http://127.0.0.1:")
    assert base["decode_input_request"] == "false" and int(base["max_request_size"]) == 16 * 2**20


def test_curl_examples_with_and_without_token(tmp_path):
    props = {"inference_address": "http://0.0.0.0:8080", "management_address": "http://127.0.0.1:8081",
             "metrics_address": "http://127.0.0.1:8082"}
    # TorchServe 0.12 turns token auth on unless disable_token_authorization=true
    plain = curl_examples(Server.from_config(tmp_path, 1, {**props, "disable_token_authorization": "true"}),
                          ["digits"])
    assert "curl http://127.0.0.1:8080/predictions/digits" in plain or "# no samples/digits/ to post" in plain
    for name in re.findall(r"(?:-T|@)\s*(\S+\.(?:png|jpg))", plain):  # every file a line posts exists
        assert Path(name.lstrip("@")).is_file(), name
    assert "Authorization" not in plain and "/models          # management" in plain
    oip = curl_examples(Server.from_config(tmp_path, 1, {**props, "disable_token_authorization": "true"},
                                           runtime="oip"), ["digits"])
    assert "management" not in oip and "/v2/models/digits " in oip and "GRPCInferenceService" in oip
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "k"}, "management": {"key": "m"}}))
    server = Server.from_config(tmp_path, 1, {**props, "disable_token_authorization": "false"})
    assert server.token() == "k"
    authed = curl_examples(server, ["digits"])
    assert "TOKEN=$(python3 -c" in authed and "Authorization: Bearer" in authed  # the management line has it
    assert '-H "Authorization: Bearer $TOKEN"' in authed or not Path("samples/digits").is_dir()  # fresh clone


def test_key_file_being_written_reads_as_not_yet(tmp_path):
    # TorchServe creates key_file.json empty, then writes it: a warm-up reading in between must wait,
    # not crash (this raced in CI as "Expecting value: line 1 column 1").
    key = tmp_path / "key_file.json"
    assert read_key(key) is None
    full = json.dumps({"management": {"key": "m"}, "inference": {"key": "k"}, "API": {"key": "a"}})
    for partial in ("", full[:20]):
        key.write_text(partial)
        assert read_key(key) is None
    key.write_text(full)
    assert read_key(key) == "k" and read_key(key, "management") == "m"


def test_cli_errors_are_one_line_with_the_fix(tmp_path, capsys):
    rc = main(["serve", "--artifacts-dir", str(tmp_path / "a"), "--model-store", str(tmp_path / "s"),
               "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "make train export" in err[0]
    rc = main(["archive", "--run", "nope", "--artifacts-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "make export RUN=nope" in err[0]
    rc = main(["stop", "--workdir", str(tmp_path / "w")])
    assert rc == 0 and "no server running" in capsys.readouterr().out


def test_client_predict_takes_files_before_or_after_options(tmp_path, capsys):
    from serving.client import main as client_main

    missing = str(tmp_path / "cat.png")
    for argv in (["predict", "--run", "cifarnet", missing], ["predict", missing, "--run", "cifarnet"]):
        # parsed either way: it gets as far as reading the (missing) file, not an argparse exit 2
        assert client_main([*argv, "--key-file", ""]) == 1
        assert "cat.png" in capsys.readouterr().err
