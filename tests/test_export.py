"""Export stage: real exports of tiny trained models, loaded back by the server's loader
(``export.runtime.load_variant``: ONNX Runtime and TorchScript), gates that really fail, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from export import registry
from export.core import ExportConfig, GateError, export_run
from export.data import load_pixels, random_pixels
from export.measure import eager_predict
from export.measure import predict_all
from export.runtime import (MANIFEST_NAME, VARIANTS, IntegrityError, load_checked_variant, load_reference,
                            load_variant, read_manifest, sha256_file)
from training.checkpoint import load_checkpoint, model_from_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """load_variant(threads=N) sets torch's process-wide thread count; leave it as found for later tests."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def small_config(ckpt: Path, out_dir: Path, **overrides) -> ExportConfig:
    """Small check/calibration sets and one short latency round: seconds, not minutes."""
    base = ExportConfig(run=ckpt.parent.name, runs_dir=str(ckpt.parent.parent), out_dir=str(out_dir),
                        calib_size=256, check_size=100, eval_size=0, latency_rounds=1,
                        latency_threads=(1,))
    return replace(base, **overrides)


@pytest.fixture(scope="session")
def digits_artifacts(digits_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifacts")
    export_run(small_config(digits_checkpoint, out), log=lambda _: None)
    return out / "digits"


@pytest.fixture(scope="session")
def cifar_artifacts(cifar_checkpoint, tmp_path_factory) -> Path:
    """3-channel contract; the tiny CIFAR model is barely trained, so only parity is meaningful:
    the INT8 accuracy gate is opened (a 100-point drop is allowed)."""
    out = tmp_path_factory.mktemp("artifacts")
    export_run(small_config(cifar_checkpoint, out, latency_rounds=0, max_int8_drop=100.0),
               log=lambda _: None)
    return out / "cifarnet"


def eager_reference(artifact_dir: Path):
    manifest = read_manifest(artifact_dir)
    model, contract = model_from_checkpoint(load_checkpoint(manifest["source"]["checkpoint"]))
    return eager_predict(model, contract), contract


# ---- every variant, through the server's loader, against eager on fresh random inputs -----------
@pytest.mark.parametrize("run", ["digits", "cifar"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_eager_on_random_inputs(run, variant, request):
    artifact_dir = request.getfixturevalue(f"{run}_artifacts")
    eager, contract = eager_reference(artifact_dir)
    runner = load_variant(artifact_dir, variant, threads=1)
    pixels = random_pixels(contract, 64, seed=12345)  # not the images export checked
    expected, got = eager(pixels), runner(pixels)
    assert got.shape == (64, contract.num_classes) and got.dtype == np.float32
    agreement = float((expected.argmax(1) == got.argmax(1)).mean())
    if runner.precision == "fp32":
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
        assert agreement == 1.0
    else:
        # INT8 approximates: logits close on average, and where the top-1 differs it is a near-tie in
        # eager (noise images give small, close logits: ~90 % agreement measured on trained models).
        scale = np.abs(expected).max()
        assert np.abs(got - expected).mean() < 0.1 * scale, (variant, np.abs(got - expected).mean(), scale)
        rows = np.arange(len(pixels))
        eager_gap = expected[rows, expected.argmax(1)] - expected[rows, got.argmax(1)]
        assert eager_gap.max() < 0.25 * scale, (variant, eager_gap.max(), scale)
        assert agreement >= 0.75, (variant, agreement)


def test_manifest_records_contract_hashes_and_measurements(digits_artifacts, digits_checkpoint):
    manifest = read_manifest(digits_artifacts)
    ckpt = load_checkpoint(digits_checkpoint)
    assert manifest["name"] == "digits"
    assert manifest["contract"] == json.loads(json.dumps(ckpt["contract"]))
    assert manifest["source"]["sha256"] == sha256_file(digits_checkpoint)
    assert manifest["version"] == f"{ckpt['epoch']}.{manifest['source']['sha256'][:8]}"
    assert list(manifest["variants"]) == list(VARIANTS)
    for name, entry in manifest["variants"].items():
        path = digits_artifacts / entry["file"]
        assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
        assert 0.0 <= entry["accuracy"] <= 1.0 and entry["parity"]["samples"] == 100
        # one entry per thread count asked for; images/s is batch 64's median turned around
        assert list(entry["latency"]) == ["threads_1"]
        timed = entry["latency"]["threads_1"]
        assert timed["batch64_images_per_s"] == pytest.approx(64e3 / timed["batch64_p50_ms"], rel=1e-2)
    for name in ("torchscript-fp32", "onnx-fp32"):
        assert manifest["variants"][name]["parity"]["top1_agreement"] == 1.0
    # no --cpu-default: the variant fastest at batch 1 on one thread, by this manifest's own numbers
    fastest = min(manifest["variants"], key=lambda v: manifest["variants"][v]["latency"]["threads_1"]["batch1_p50_ms"])
    assert manifest["default_variant"]["cpu"] == fastest
    assert manifest["default_variant"]["cuda"] in ("torchscript-fp32", "onnx-fp32")
    assert not list(digits_artifacts.parent.glob(".digits.staging-*")), "staging folder left behind"


def test_int8_models_are_smaller(digits_artifacts):
    v = read_manifest(digits_artifacts)["variants"]
    assert v["onnx-int8"]["bytes"] < 0.5 * v["onnx-fp32"]["bytes"]
    assert v["torchscript-int8"]["bytes"] < 0.5 * v["torchscript-fp32"]["bytes"]


def test_onnx_graph_is_checked_and_has_a_dynamic_batch(digits_artifacts):
    import onnx

    model = onnx.load(str(digits_artifacts / "onnx-fp32.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_default_variant_and_device_rules(digits_artifacts):
    runner = load_variant(digits_artifacts)
    assert runner.variant == read_manifest(digits_artifacts)["default_variant"]["cpu"]
    with pytest.raises(ValueError, match="cpu"):
        load_variant(digits_artifacts, "torchscript-int8", device="cuda")
    with pytest.raises(ValueError, match="choose one of"):
        load_variant(digits_artifacts, "tensorrt-fp16")


def test_runner_rejects_wrong_input(digits_artifacts):
    runner = load_variant(digits_artifacts, "onnx-fp32")
    with pytest.raises(ValueError, match="uint8"):
        runner(np.zeros((1, 1, 28, 28), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        runner(np.zeros((1, 3, 28, 28), dtype=np.uint8))


# ---- integrity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["onnx-fp32", "torchscript-int8"])
def test_tampered_file_fails_the_sha256_check(digits_artifacts, tmp_path, variant):
    copy = tmp_path / "digits"
    shutil.copytree(digits_artifacts, copy)
    entry = read_manifest(copy)["variants"][variant]
    path = copy / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        load_variant(copy, variant)
    msg = str(err.value)
    assert entry["file"] in msg and entry["sha256"] in msg and sha256_file(path) in msg
    assert "make export" in msg
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_variant(copy, variant)


# ---- the reference batch and the calibration every artifact carries ------------------------------
def test_reference_batch_is_eager_fp32_on_held_out_images_and_every_variant_reproduces_it(digits_artifacts):
    manifest = read_manifest(digits_artifacts)
    ref = load_reference(digits_artifacts, manifest)  # sha256-checked
    assert manifest["reference"]["samples"] == len(ref.labels) == 100  # check_size 100 < reference_size
    assert ref.images.dtype == np.uint8 and ref.images.shape == (100, 1, 28, 28)
    eager, _ = eager_reference(digits_artifacts)
    np.testing.assert_allclose(predict_all(eager, ref.images), ref.logits, atol=1e-5)
    for name, entry in manifest["variants"].items():
        assert entry["reference_check"]["samples"] == 100
        runner = load_checked_variant(digits_artifacts, name)  # passes on the export machine itself
        assert runner.variant == name and runner.reference_check["top1_agreement"] >= 0.9


def test_tampered_reference_batch_fails_the_sha256_check(digits_artifacts, tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(digits_artifacts, copy)
    path = copy / read_manifest(copy)["reference"]["file"]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="reference.npz: sha256 mismatch"):
        load_checked_variant(copy, "onnx-fp32")


def test_temperature_is_fitted_on_the_val_split_and_reported_on_the_test_split(digits_artifacts):
    cal = read_manifest(digits_artifacts)["calibration"]
    assert cal["fitted_on"]["split"] == "val" and cal["fitted_on"]["samples"] > 0
    assert cal["ece_bins"] == 15 and 0.05 < cal["temperature"] < 20
    t = cal["test"]
    assert t["samples"] > 0 and all(0 <= t[k] <= 1 for k in ("ece_before", "ece_after"))
    assert all(np.isfinite(t[k]) and t[k] >= 0 for k in ("nll_before", "nll_after"))


def test_missing_or_broken_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make export"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(tmp_path)


# ---- gates really fail ---------------------------------------------------------------------------
def test_int8_gate_fails_when_the_allowed_drop_is_negative(digits_checkpoint, tmp_path):
    cfg = small_config(digits_checkpoint, tmp_path, variants=("torchscript-int8",), max_int8_drop=-1.0,
                       latency_rounds=0)
    with pytest.raises(GateError, match=r"torchscript-int8: accuracy 0\.\d{4} is -?\d+\.\d\d points below"):
        export_run(cfg, log=lambda _: None)
    assert not (tmp_path / "digits").exists(), "a failed export must publish nothing"
    assert not list(tmp_path.glob(".digits.staging-*"))


def test_a_rejected_int8_variant_is_recorded_and_the_rest_published(digits_checkpoint, tmp_path):
    """An INT8 variant that misses its gate with every recipe is rejected, not fatal: the fp32
    variants are published, the manifest says why, and nothing can load or serve it."""
    from serving.archive import ArchiveConfig, chosen_variants

    lines = []
    cfg = small_config(digits_checkpoint, tmp_path, variants=("onnx-fp32", "onnx-int8"), max_int8_drop=-1.0,
                       latency_rounds=0)
    manifest = export_run(cfg, log=lines.append)
    assert list(manifest["variants"]) == ["onnx-fp32"] and manifest["default_variant"]["cpu"] == "onnx-fp32"
    rejected = manifest["rejected"]["onnx-int8"]
    assert "points below eager fp32" in rejected["reason"] and rejected["accuracy"] > 0
    assert [t["recipe"] for t in rejected["recipes_tried"]] == list(registry.get("onnx-int8").recipes)
    assert not (tmp_path / "digits" / "onnx-int8.onnx").exists()
    assert read_manifest(tmp_path / "digits")["rejected"].keys() == {"onnx-int8"}
    assert [ln for ln in lines if ln.startswith("warning:")] == [
        ln for ln in lines if "onnx-int8 rejected, not published" in ln] and len(
        [ln for ln in lines if ln.startswith("warning:")]) == 1
    with pytest.raises(ValueError, match="export rejected it"):
        load_variant(tmp_path / "digits", "onnx-int8")
    with pytest.raises(ValueError, match="not in"):
        chosen_variants(manifest, ArchiveConfig(run="digits", artifacts_dir=str(tmp_path),
                                                variant_cpu="onnx-int8"))
    strict = replace(cfg, out_dir=str(tmp_path / "strict"), strict=True)
    with pytest.raises(GateError, match="--strict.*onnx-int8"):
        export_run(strict, log=lambda _: None)
    assert not (tmp_path / "strict" / "digits").exists()


def test_a_new_variant_needs_one_registration(digits_checkpoint, tmp_path):
    """The registry is the only place a variant is named: export, the loader, the archive settings
    and the handler's config all accept a variant registered once."""
    from serving.archive import ArchiveConfig
    from serving.handler import HandlerConfig

    def build(ctx, path, recipe):
        from export.variants import export_onnx
        export_onnx(ctx.model, ctx.contract, path)

    registry.register(registry.Variant("onnx-fp32-copy", ".onnx", "onnxruntime", "fp32", ("cpu",), build))
    try:
        cfg = small_config(digits_checkpoint, tmp_path, variants=("onnx-fp32-copy",), latency_rounds=0)
        manifest = export_run(cfg, log=lambda _: None)
        assert list(manifest["variants"]) == ["onnx-fp32-copy"]
        runner = load_variant(tmp_path / "digits", "onnx-fp32-copy")
        assert runner(np.zeros((1, 1, 28, 28), np.uint8)).shape == (1, 10)
        ArchiveConfig(run="digits", variant_cpu="onnx-fp32-copy")
        assert HandlerConfig.from_yaml({"handler": {"variant_cpu": "onnx-fp32-copy"}}).variant_cpu == "onnx-fp32-copy"
    finally:
        registry.unregister("onnx-fp32-copy")


def test_cli_rejection_is_one_warning_line_and_exit_0(digits_checkpoint, tmp_path):
    runs = str(digits_checkpoint.parent.parent)
    res = run_cli("--run", "digits", "--runs-dir", runs, "--out-dir", str(tmp_path), "--variants",
                  "onnx-fp32,torchscript-int8", "--calib-size", "32", "--eval-size", "100",
                  "--latency-rounds", "0", "--max-int8-drop", "-1")
    assert res.returncode == 0, res.stderr
    warnings = [ln for ln in res.stdout.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "torchscript-int8 rejected" in warnings[0]


def test_fp32_parity_gate_fails_with_an_impossible_tolerance(digits_checkpoint, tmp_path):
    cfg = small_config(digits_checkpoint, tmp_path, variants=("torchscript-fp32",), atol=-1.0,
                       latency_rounds=0)
    with pytest.raises(GateError, match=r"torchscript-fp32: parity: top-1 agreement 1\.0000"):
        export_run(cfg, log=lambda _: None)


def test_heldout_pixels_are_the_dataset_images_exactly():
    """The uint8 images the gates use are the dataset's own pixels (normalisation undone exactly)."""
    from training.data import _digits_arrays, load_splits

    contract = load_splits("digits").contract
    pixels = load_pixels("digits", None, contract, "test")
    images, labels = _digits_arrays(False)
    np.testing.assert_array_equal(pixels.images[:, 0], images)
    np.testing.assert_array_equal(pixels.labels, labels)


# ---- CLI -------------------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "export", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_cli_gate_failure_exits_nonzero_with_one_line(digits_checkpoint, tmp_path):
    runs = str(digits_checkpoint.parent.parent)
    res = run_cli("--run", "digits", "--runs-dir", runs, "--out-dir", str(tmp_path), "--variants",
                  "torchscript-int8", "--calib-size", "32", "--eval-size", "100", "--latency-rounds", "0",
                  "--max-int8-drop", "-1")
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "torchscript-int8: accuracy" in lines[0]


def test_cli_missing_checkpoint_exits_2(tmp_path, capsys):
    from export.__main__ import main

    assert main(["--run", "nope", "--runs-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: checkpoint {tmp_path}/nope/best.pt not found; train it first: make train RUN=nope"]


def test_cli_rejects_unknown_variant(tmp_path, capsys):
    from export.__main__ import main

    assert main(["--run", "digits", "--runs-dir", str(tmp_path), "--variants", "onnx-fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown variants ['onnx-fp16']" in err[0]


def test_bench_script_writes_a_markdown_table(digits_artifacts, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_export", REPO / "bench" / "bench_export.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.md"
    assert bench.main([str(digits_artifacts), "--threads", "1", "--rounds", "1", "--out", str(out),
                       "--ort-profile"]) == 0
    text = out.read_text()
    for name in ("eager-fp32", *VARIANTS):
        assert f"| {name} | " in text
    assert "ORT fp32 vs eager at batch 1" in text and "best INT8" in text
    profile = text[text.index("ORT profile of digits onnx-fp32"):].splitlines()
    rows = [row for row in profile if row.startswith("| ")][1:]  # below the header
    shares = [int(row.rstrip(" |").rsplit("|", 1)[1].strip(" %")) for row in rows]
    assert any(row.startswith("| Conv | ") for row in rows) and 95 <= sum(shares) <= 105


def test_cpu_name_names_the_isa_that_moves_int8_numbers():
    from training.machine import cpu_name

    avx2 = "model name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n"
    vnni = "model name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512bw avx512_vnni avx_vnni\n"
    assert cpu_name(avx2) == f"AMD EPYC 7B12 ({os.cpu_count()} logical CPUs; avx2)"
    assert cpu_name(vnni).endswith("; avx2, avx512f, avx512_vnni, avx_vnni)")
    assert cpu_name("model name : Old\nflags : sse2\n").endswith("; no AVX2)")


def test_reference_check_gates_int8_by_accuracy_and_fp32_by_logits():
    from export.runtime import Reference, reference_check

    gates = {"fp32_top1_agreement": 1.0, "fp32_atol": 1e-3, "int8_max_drop_points": 1.0}
    labels = np.arange(100) % 10
    logits = np.eye(10, dtype=np.float32)[labels] * 5
    ref = Reference(np.zeros((100, 1, 2, 2), np.uint8), labels, logits)
    assert reference_check(logits + 1e-4, ref, "fp32", gates)[1] is None
    assert "max |logit diff| 0.01" in reference_check(logits + 0.01, ref, "fp32", gates)[1]
    wrong = logits.copy()
    wrong[:1] = np.roll(wrong[:1], 1, axis=1)  # one image flipped: 1 point on 100 images, the gate itself
    assert reference_check(wrong, ref, "int8", gates)[1] is None
    wrong[:2] = np.roll(logits[:2], 1, axis=1)  # two images flipped: 2 points on 100 images
    numbers, why = reference_check(wrong, ref, "int8", gates)
    assert numbers["drop_points"] == pytest.approx(2.0) and "2.00 points below" in why


def test_flip_tta_survives_every_export_format(tmp_path):
    """A resnet8 with flip TTA: TorchScript and ONNX give the eager model's logits, and a mirror image
    the same answer as the image (the augmentation is in the graph, not in the serving code)."""
    import onnxruntime as ort

    from export.variants import INPUT_NAME, export_onnx, export_torchscript, quantize_onnx, quantize_torch
    from training.contract import Contract, WithPreprocessing
    from training.models import build_model

    torch.manual_seed(0)
    contract = Contract(28, 28, 1, (0.3,), (0.35,), tuple("abcdefghij"))
    model = build_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=8, flip_tta=True).eval()
    pixels = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        eager = WithPreprocessing(model, contract).eval()(pixels)
    export_torchscript(model, contract, tmp_path / "m.pt")
    export_onnx(model, contract, tmp_path / "m.onnx")
    quantize_onnx(tmp_path / "m.onnx", pixels.numpy(), tmp_path / "m-int8.onnx")  # ORT's shape inference
    int8_session = ort.InferenceSession(str(tmp_path / "m-int8.onnx"), providers=["CPUExecutionProvider"])
    assert int8_session.run(None, {INPUT_NAME: pixels.numpy()})[0].shape == (5, 10)
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for x in (pixels, pixels.flip(-1)):
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), eager, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0]), eager,
                                   atol=1e-4, rtol=1e-4)
    # INT8: a mirror image gets the same answer up to a quantisation step (the requantised sum is not
    # exactly symmetric), far closer than the same weights without TTA give.
    plain = build_model("resnet8", in_channels=1, num_classes=10, image_size=28, width=8)
    plain.load_state_dict(model.state_dict())
    normalize = WithPreprocessing(torch.nn.Identity(), contract).normalize
    with torch.no_grad():
        change = {}
        for name, m in (("tta", model), ("plain", plain.eval())):
            int8 = quantize_torch(m, contract, pixels.numpy())
            logits = int8(normalize(pixels))
            assert logits.shape == (5, 10)
            change[name] = float((int8(normalize(pixels.flip(-1))) - logits).abs().max())
    assert change["tta"] < change["plain"] / 4, change
