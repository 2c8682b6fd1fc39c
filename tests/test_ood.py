"""The out-of-distribution detector (export/ood.py): its parts, its round trip export -> archive ->
handler -> a served answer, and the model exported without one.

The tiny 1-2 epoch models of the test session do not separate digits from other things well, so
these tests are about exactness and plumbing (the served flag is the export-time computation on the
same pixels); how well the detector separates is bench/bench_ood.py's job (docs/export.md).
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from export import ood
from export.runtime import load_checked_variant, load_reference, load_variant, read_manifest, reference_check
from serving.client import heldout_digits
from serving.core import InferenceCore, Limits
from training.images import encode_png
from training.models import build_model

from served import LIMITS, post


def photo_crops(contract, n: int = 6, size: int = 100) -> np.ndarray:
    """Crops of scikit-learn's two sample photos, through the server's own conversion to the contract:
    (n, C, H, W) uint8, what a photo posted to the model turns into."""
    from sklearn.datasets import load_sample_images

    core = InferenceCore(type("Stub", (), {"contract": contract, "manifest": {}})())
    crops = []
    for img in load_sample_images().images:
        for y, x in ((0, 0), (150, 200), (300, 400)):
            crops.append(core.to_pixels(encode_png(np.ascontiguousarray(img[y:y + size, x:x + size].transpose(2, 0, 1)))))
    return np.stack(crops[:n])


def probe_pixels(contract, seed: int = 0) -> np.ndarray:
    """In- and out-of-distribution pixels for a contract: held-out digits (1-channel models), photo
    crops, uniform noise, black and white."""
    rng = np.random.default_rng(seed)
    parts = [photo_crops(contract), rng.integers(0, 256, (4, *contract.input_shape), dtype=np.uint8),
             np.zeros((1, *contract.input_shape), np.uint8), np.full((1, *contract.input_shape), 255, np.uint8)]
    if contract.channels == 1:
        parts.insert(0, heldout_digits(8, seed=seed)[0])
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------------------
# the parts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, channels, size", [("lenet", 1, 28), ("mnist_cnn", 1, 28), ("simple_cnn", 1, 28),
                                                  ("cifarnet", 3, 32), ("bn_cnn", 1, 28), ("resnet9", 3, 32),
                                                  ("resnet8", 1, 28), ("resnet8+flip_tta", 1, 28)])
def test_with_features_keeps_the_logits_and_gives_the_head_input(arch, channels, size):
    torch.manual_seed(0)
    arch, _, flag = arch.partition("+")
    extra = {flag: True} if flag else {}
    model = build_model(arch, in_channels=channels, num_classes=10, image_size=size, **extra).eval()
    x = torch.randn(3, channels, size, size)
    logits, features = ood.with_features(model)(x)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        assert torch.equal(logits, model(x))
        assert features.shape == (3, head.in_features)
        scale = getattr(model, "logit_scale", 1.0)  # resnet9 scales its head's output
        torch.testing.assert_close(head(features) * scale, logits)


def clusters(seed: int = 0, n: int = 200, dim: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two well separated classes of features, and points far from both."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((2, dim))
    centres[0, 0], centres[1, 1] = 5.0, 5.0
    labels = rng.integers(0, 2, n)
    features = centres[labels] + rng.normal(0, 0.5, (n, dim))
    far = rng.normal(0, 0.5, (20, dim)) + np.r_[[0, 0, 5.0], np.zeros(dim - 3)]
    return np.abs(features), labels, np.abs(far)


def logits_of(features: np.ndarray) -> np.ndarray:
    return features[:, :2] * 2.0  # a "head": class 0 reads dimension 0, class 1 dimension 1


@pytest.mark.parametrize("method", ["mahalanobis", "mahalanobis-normalised", "knn"])
def test_feature_detectors_score_points_away_from_the_training_data_higher(method):
    features, labels, far = clusters()
    det = ood.fit_detector(method, features[:150], labels[:150], 2)
    near = det.score(logits_of(features[150:]), features[150:])
    away = det.score(logits_of(far), far)
    assert near.shape == (50,) and away.shape == (20,)
    assert ood.auroc(near, away) == 1.0 and ood.fpr_at_tpr(near, away) == 0.0


def test_mahalanobis_score_is_the_distance_to_the_nearest_class_mean():
    features, labels, _ = clusters(seed=1)
    det = ood.fit_detector("mahalanobis", features, labels, 2)
    x = features[:7]
    d = x[:, None, :] - det.arrays["means"][None]
    direct = np.einsum("ncd,de,nce->nc", d, det.arrays["precision"], d).min(axis=1)
    np.testing.assert_allclose(det.score(logits_of(x), x), direct, rtol=1e-9, atol=1e-9)


def test_msp_and_energy_read_the_logits_only():
    logits = np.array([[10.0, 0.0], [0.1, 0.0]])
    msp = ood.fit_detector("msp", np.zeros((2, 3)), np.array([0, 1]), 2)
    energy = ood.fit_detector("energy", np.zeros((2, 3)), np.array([0, 1]), 2, temperature=2.0)
    assert not msp.needs_features and not energy.needs_features
    s = msp.score(logits, None)
    assert s[0] < 1e-4 and abs(s[1] - (1 - 1 / (1 + np.exp(-0.1)))) < 1e-9
    assert energy.score(logits, None)[0] < energy.score(logits, None)[1]
    with pytest.raises(ValueError, match="features output"):
        ood.fit_detector("knn", np.ones((2, 3)), np.array([0, 1]), 2).score(logits, None)


def test_threshold_accepts_the_share_asked_and_flags_above_it():
    scores = np.arange(100, dtype=float)
    t = ood.threshold_at(scores, 0.95)
    det = ood.Detector("msp", threshold=t)
    assert det.flags(scores).sum() == 4 and (scores <= t).mean() >= 0.95
    with pytest.raises(ValueError, match="acceptance"):
        ood.threshold_at(scores, 0.0)
    with pytest.raises(ValueError, match="choose one of"):
        ood.Detector("entropy")


def test_detector_file_round_trip(tmp_path):
    features, labels, far = clusters(seed=2)
    for method in ood.METHODS:
        det = ood.fit_detector(method, features, labels, 2, temperature=0.7, k=3).with_threshold(1.25)
        ood.save_detector(tmp_path / "ood.npz", det)
        back = ood.load_detector(tmp_path / "ood.npz")
        assert (back.method, back.threshold, back.temperature, back.k) == (method, 1.25, 0.7, det.k)
        assert det.k == (3 if method == "knn" else ood.DEFAULT_KNN_K)
        np.testing.assert_array_equal(back.score(logits_of(far), far), det.score(logits_of(far), far))


def test_export_config_refuses_bad_detector_settings():
    from export.core import ExportConfig

    for bad, match in ((dict(ood_method="odin"), "--ood-method"), (dict(ood_acceptance=1.0), "--ood-acceptance"),
                       (dict(ood_knn_k=0), "--ood-knn-k")):
        with pytest.raises(ValueError, match=match):
            ExportConfig(run="x", **bad)


# --------------------------------------------------------------------------------------------------
# export: the manifest, the gates, every variant
# --------------------------------------------------------------------------------------------------
def test_export_fits_and_records_the_detector(serve_artifacts):
    artifacts, manifests = serve_artifacts
    for run, manifest in manifests.items():
        entry = manifest["ood"]
        assert entry["method"] == ood.DEFAULT_METHOD and entry["acceptance"] == ood.DEFAULT_ACCEPTANCE
        assert entry["fitted_on"]["split"] == "train" and entry["fitted_on"]["samples"] > 0
        # the threshold is the validation split's, never the test split's
        assert entry["threshold_on"]["split"].startswith(("val", "train")) and entry["heldout"]["split"] == "test"
        assert entry["threshold_on"]["accepted"] >= entry["acceptance"]
        assert 0.0 <= entry["heldout"]["ood_share"] <= 1.0
        gates = manifest["gates"]
        assert gates["ood_fp32_atol"] == pytest.approx(ood.FP32_SCORE_RTOL * abs(entry["threshold"]))
        ref = load_reference(artifacts / run, manifest)
        assert ref.ood_scores is not None and ref.ood_scores.shape == ref.labels.shape
        for name, v in manifest["variants"].items():
            assert v["ood"]["samples"] == manifest["heldout"]["samples"], (run, name)
            assert "ood_max_score_diff" in v["reference_check"], (run, name)
            if v["precision"] == "fp32":
                assert v["ood"]["max_score_diff"] <= gates["ood_fp32_atol"], (run, name, v["ood"])


def test_every_variant_scores_as_export_did_through_the_servers_loader(serve_artifacts):
    """Each variant, loaded as a worker loads it (hash checks, reference check), gives eager fp32's
    scores on the reference batch within its gate, and the flags its own scores give."""
    artifacts, manifests = serve_artifacts
    for run, manifest in manifests.items():
        ref = load_reference(artifacts / run, manifest)
        for name in manifest["variants"]:
            runner = load_checked_variant(artifacts / run, name)
            assert runner.reference_check["ood_max_score_diff"] is not None
            logits, scores = runner.infer(ref.images)
            if runner.precision == "fp32":
                np.testing.assert_allclose(scores, ref.ood_scores, rtol=0, atol=manifest["gates"]["ood_fp32_atol"])
            pixels = probe_pixels(runner.contract)
            flags = runner.detector.flags(runner.infer(pixels)[1])
            assert flags.dtype == bool and flags.shape == (len(pixels),)


def test_reference_check_fails_a_variant_whose_scores_moved(serve_artifacts):
    artifacts, manifests = serve_artifacts
    manifest = manifests["digits"]
    ref = load_reference(artifacts / "digits", manifest)
    threshold, gates = manifest["ood"]["threshold"], manifest["gates"]
    numbers, why = reference_check(ref.logits, ref, "fp32", gates, ref.ood_scores, threshold)
    assert why is None and numbers["ood_max_score_diff"] == 0.0
    _, why = reference_check(ref.logits, ref, "fp32", gates, ref.ood_scores + 2 * gates["ood_fp32_atol"], threshold)
    assert why and "out-of-distribution score" in why
    # INT8: judged on the flag; every image flagged is far over any accuracy-sized budget
    flipped = np.where(ref.ood_scores > threshold, 0.0, threshold * 2 + 1)
    _, why = reference_check(ref.logits, ref, "int8", {**gates, "ood_int8_max_flag_change_points": 1.0},
                             flipped, threshold)
    assert why and "out-of-distribution flag" in why


# --------------------------------------------------------------------------------------------------
# the handler, in process, with every variant's real runner
# --------------------------------------------------------------------------------------------------
def v2_pixels_request(pixels: np.ndarray) -> dict:
    return {"body": json.dumps({"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
                                            "data": pixels.reshape(-1).tolist()}],
                                "parameters": {"topk": 1}}).encode()}


def outputs_of(doc: dict) -> dict:
    return {o["name"]: o["data"] for o in doc["outputs"]}


def handler_for(runner, ood_abstain: bool = True):
    from serving.handler import ClassifierHandler

    handler = ClassifierHandler()
    handler.setup(runner, Limits(), runner.manifest["name"], None, 0.0, ood_abstain)
    return handler


def test_handler_answers_carry_the_export_time_flags_for_every_variant(serve_artifacts):
    artifacts, manifests = serve_artifacts
    for run, manifest in manifests.items():
        for name in manifest["variants"]:
            runner = load_variant(artifacts / run, name)
            pixels = probe_pixels(runner.contract)
            _, scores = runner.infer(pixels)
            expected = [bool(f) for f in runner.detector.flags(scores)]
            out = outputs_of(json.loads(handler_for(runner).handle([v2_pixels_request(pixels)], None)[0]))
            assert out["ood"] == expected, (run, name)
            np.testing.assert_allclose(out["ood_score"], scores, rtol=1e-6, atol=1e-6)
            assert all(a or not o for a, o in zip(out["abstain"], out["ood"]))  # ood -> abstain
            quiet = outputs_of(json.loads(handler_for(runner, ood_abstain=False).handle(
                [v2_pixels_request(pixels)], None)[0]))
            assert quiet["ood"] == expected and quiet["abstain"] == [False] * len(pixels)


def test_handler_config_reads_ood_abstain():
    from serving.handler import HandlerConfig

    assert HandlerConfig.from_yaml({}).ood_abstain is True
    assert HandlerConfig.from_yaml({"handler": {"ood_abstain": False}}).ood_abstain is False
    with pytest.raises(ValueError, match="ood_abstain must be true or false"):
        HandlerConfig.from_yaml({"handler": {"ood_abstain": "no"}})


def test_a_model_exported_without_a_detector_archives_and_serves_without_the_flag(digits_checkpoint, tmp_path):
    """What a model exported before the detector existed looks like: one-output graphs, no ood entry."""
    from export.core import ExportConfig, export_run
    from serving.archive import ArchiveConfig, build_archive

    export_run(ExportConfig(run="digits", runs_dir=str(digits_checkpoint.parent.parent), out_dir=str(tmp_path / "a"),
                            checkpoint=str(digits_checkpoint), variants=("onnx-fp32",), check_size=64,
                            eval_size=120, latency_rounds=0, ood_method="none"), log=lambda _m: None)
    manifest = read_manifest(tmp_path / "a" / "digits")
    assert "ood" not in manifest and "ood_fp32_atol" not in manifest["gates"]
    mar = build_archive(ArchiveConfig(run="digits", artifacts_dir=str(tmp_path / "a"),
                                      model_store=str(tmp_path / "store")), log=lambda _m: None)
    assert ood.OOD_NAME not in zipfile.ZipFile(mar).namelist()
    runner = load_checked_variant(tmp_path / "a" / "digits")
    assert runner.detector is None and runner.infer(heldout_digits(2)[0])[1] is None
    pixels = heldout_digits(3)[0]
    out = json.loads(handler_for(runner).handle([v2_pixels_request(pixels)], None)[0])
    assert [o["name"] for o in out["outputs"]] == ["label", "index", "probability", "abstain"]
    plain = json.loads(handler_for(runner).handle([{"body": encode_png(pixels[0])}], None)[0])
    assert "ood" not in plain and "ood_score" not in plain and plain["abstain"] == [False]


# --------------------------------------------------------------------------------------------------
# the real server (both runtimes)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["digits", "cifarnet"])
def test_served_flags_are_the_export_time_computation(served, model):
    """The same pixels (v2 UINT8: no decoding in between) through the server and through the variant
    it serves, loaded from the export's artifacts: equal flags, equal scores to the answer's 6 decimals."""
    artifact_dir = served["artifacts"] / model
    contract = load_variant(artifact_dir).contract
    pixels = probe_pixels(contract, seed=3)
    flags, served_scores, variants = [], [], set()
    for i in range(0, len(pixels), LIMITS.max_images):  # the session server's per-request limit
        status, doc, _ = post(served, model, v2_pixels_request(pixels[i:i + LIMITS.max_images])["body"],
                              "application/json", path=f"/v2/models/{model}/infer")
        assert status == 200, doc
        flags += outputs_of(doc)["ood"]
        served_scores += outputs_of(doc)["ood_score"]
        variants.add(doc["parameters"]["variant"])
    assert len(variants) == 1, variants
    runner = load_variant(artifact_dir, variants.pop())
    _, scores = runner.infer(pixels)
    assert flags == [bool(f) for f in runner.detector.flags(scores)]
    np.testing.assert_allclose(served_scores, scores, rtol=1e-6, atol=1e-6)


def test_a_photo_posted_to_the_served_digits_model_comes_back_ood(served):
    from sklearn.datasets import load_sample_images

    import io

    from PIL import Image

    china = io.BytesIO()  # the palace photo of the issue, as a camera would send it
    Image.fromarray(load_sample_images().images[0]).save(china, "JPEG", quality=85)
    assert len(china.getvalue()) <= LIMITS.max_image_bytes
    status, doc, _ = post(served, "digits", china.getvalue(), "image/jpeg")
    assert status == 200, doc
    assert doc["ood"] == [True] and doc["abstain"] == [True], doc
    assert doc["ood_score"][0] > served["manifests"]["digits"]["ood"]["threshold"]
