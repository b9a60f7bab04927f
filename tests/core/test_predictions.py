"""Prediction adapters: every supported shape, and clear errors for the rest."""

from __future__ import annotations

import math

import numpy as np
import pytest
import supervision as sv

from mmagg import to_batch


def detections(n: int = 3, *, masks: bool = False, keypoints: bool = False) -> sv.Detections:
    rng = np.random.default_rng(n)
    det = sv.Detections(
        xyxy=rng.random((n, 4)) * 100,
        confidence=np.linspace(0.5, 0.9, n).astype(np.float32),
        class_id=np.arange(n),
        mask=np.zeros((n, 48, 64), dtype=bool) if masks else None,
    )
    det.data["class_name"] = np.array([f"c{i}" for i in range(n)])
    det.data["inference_id"] = np.array(["inf-1"] * n)
    det.data["prediction_type"] = np.array(
        ["keypoint-detection" if keypoints else "object-detection"] * n
    )
    return det


@pytest.mark.parametrize("masks", [False, True])
def test_detections_columns(masks: bool) -> None:
    batch = to_batch(detections(3, masks=masks))
    assert batch is not None
    assert batch.class_names.tolist() == ["c0", "c1", "c2"]
    assert np.allclose(batch.confidences, [0.5, 0.7, 0.9])
    assert batch.confidences.dtype == np.float64
    assert batch.inference_ids.tolist() == ["inf-1"] * 3
    assert batch.model_types.tolist() == ["object-detection"] * 3


def test_detections_missing_columns_default_like_the_original() -> None:
    det = sv.Detections(xyxy=np.zeros((2, 4)), confidence=None)
    batch = to_batch(det)
    assert batch is not None
    assert batch.class_names.tolist() == ["", ""]
    assert batch.confidences.tolist() == [0.0, 0.0]
    assert batch.inference_ids.tolist() == ["", ""]


def test_object_column_with_none_means_missing() -> None:
    det = detections(2)
    det.data["class_name"] = np.array(["a", None], dtype=object)
    batch = to_batch(det)
    assert batch is not None and batch.class_names.tolist() == ["a", ""]


def test_columns_are_copies() -> None:
    det = detections(2)
    batch = to_batch(det)
    det.data["class_name"][0] = "changed"
    det.confidence[0] = 0.0
    assert batch is not None
    assert batch.class_names[0] == "c0" and batch.confidences[0] == pytest.approx(0.5)


@pytest.mark.parametrize("empty", [None, sv.Detections.empty(), {"predictions": []}])
def test_empty_is_not_collected(empty: object) -> None:
    assert to_batch(empty) is None


def test_single_label_classification() -> None:
    response = {
        "inference_id": "abc",
        "prediction_type": "classification",
        "top": "dog",
        "confidence": 0.8,
        "predictions": [
            {"class": "dog", "class_id": 1, "confidence": 0.8},
            {"class": "cat", "class_id": 0, "confidence": 0.2},
            {"class_id": 2},
        ],
    }
    batch = to_batch(response)
    assert batch is not None
    assert batch.class_names.tolist() == ["dog", "cat", ""]
    assert batch.confidences.tolist() == [0.8, 0.2, 0.0]
    assert batch.inference_ids.tolist() == ["abc"] * 3
    assert batch.model_types.tolist() == ["classification"] * 3


def test_multi_label_classification() -> None:
    response = {
        "inference_id": "m1",
        "prediction_type": "classification",
        "predictions": {"cat": {"confidence": 0.9, "class_id": 0}, "dog": {"class_id": 1}},
        "predicted_classes": ["cat"],
    }
    batch = to_batch(response)
    assert batch is not None
    assert batch.class_names.tolist() == ["cat", "dog"]
    assert batch.confidences.tolist() == [0.9, 0.0]


def test_roboflow_http_object_detection_json() -> None:
    response = {
        "inference_id": "r-1",
        "time": 0.02,
        "image": {"width": 640, "height": 480},
        "predictions": [
            {
                "x": 1,
                "y": 2,
                "width": 3,
                "height": 4,
                "confidence": 0.66,
                "class": "car",
                "class_id": 2,
                "detection_id": "d1",
            },
        ],
    }
    batch = to_batch(response)
    assert batch is not None and batch.class_names.tolist() == ["car"]
    assert batch.inference_ids.tolist() == ["r-1"]


def test_pydantic_response_objects_are_read() -> None:
    from pydantic import BaseModel

    class Response(BaseModel):
        predictions: list[dict[str, object]]

    batch = to_batch(Response(predictions=[{"class": "x", "confidence": 0.3}]))
    assert batch is not None and batch.class_names.tolist() == ["x"]


def test_nan_passes_the_adapter_for_the_window_to_count() -> None:
    batch = to_batch({"predictions": [{"class": "x", "confidence": float("nan")}]})
    assert batch is not None and math.isnan(batch.confidences[0])


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        ([{"class": "x"}], TypeError, ["predictions", "expected", "got list"]),
        ("detections", TypeError, ["expected", "got str"]),
        (42, TypeError, ["got int"]),
        ({"preds": []}, ValueError, ["'predictions' key", "preds"]),
        (
            {"predictions": [{"class": "x", "confidence": "high"}]},
            TypeError,
            ["predictions[0].confidence", "expected a number", "str"],
        ),
        (
            {"predictions": [{"class": "x", "confidence": True}]},
            TypeError,
            ["predictions[0].confidence"],
        ),
        ({"predictions": ["x"]}, TypeError, ["predictions[0]", "got str"]),
        ({"predictions": {"cat": 0.9}}, TypeError, ["predictions['cat']", "got float"]),
        ({"predictions": "x"}, TypeError, ["expected a list", "got str"]),
        (
            {"predictions": [{"class": ["x"], "confidence": 0.1}]},
            TypeError,
            ["predictions[0].class", "expected a string", "list"],
        ),
    ],
)
def test_bad_input_names_what_was_expected_and_what_came(
    value: object, error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as info:
        to_batch(value)
    for word in words:
        assert word in str(info.value)


def test_detections_with_wrong_column_shapes() -> None:
    det = detections(3)
    det.data["class_name"] = np.array(["a", "b"])
    with pytest.raises(ValueError, match=r"class_name.*expected shape \(3,\), got \(2,\)"):
        to_batch(det)
    det = detections(3)
    det.confidence = np.array(["a", "b", "c"])
    with pytest.raises(TypeError, match="confidence: expected a numeric array"):
        to_batch(det)
