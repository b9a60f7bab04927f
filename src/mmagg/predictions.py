"""Adapters: everything a model can return, turned into parallel columns.

One :class:`PredictionBatch` holds the columns the monitor needs (class name,
confidence, inference id, model type) as numpy arrays, read straight from
``sv.Detections`` without touching detections one by one, or from the
classification dictionaries that Roboflow models and its HTTP API return.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "CLASS_NAME_DATA_FIELD",
    "INFERENCE_ID_DATA_FIELD",
    "PREDICTION_TYPE_DATA_FIELD",
    "PredictionBatch",
    "to_batch",
]

CLASS_NAME_DATA_FIELD = "class_name"
INFERENCE_ID_DATA_FIELD = "inference_id"
PREDICTION_TYPE_DATA_FIELD = "prediction_type"

StrArray = npt.NDArray[np.str_]
FloatArray = npt.NDArray[np.float64]


@dataclass(slots=True)
class PredictionBatch:
    """Parallel columns of one frame's predictions (all arrays have the same length).

    Columns are never written to after construction.

    Example:
        >>> batch = to_batch({"predictions": [{"class": "cat", "confidence": 0.9}]})
        >>> batch.class_names.tolist(), batch.confidences.tolist()
        (['cat'], [0.9])
    """

    class_names: StrArray
    confidences: FloatArray
    inference_ids: StrArray
    model_types: StrArray
    #: The model's class ids when known: a faster grouping key, always checked against names.
    class_ids: npt.NDArray[np.int64] | None = None

    def __len__(self) -> int:
        return int(self.confidences.shape[0])


def to_batch(predictions: object) -> PredictionBatch | None:
    """Read one frame's predictions into columns; ``None`` when there is nothing to collect.

    Accepts ``sv.Detections`` (object detection, instance segmentation, keypoints),
    single-label classification / Roboflow JSON dicts (``predictions`` is a list of
    ``{"class", "confidence"}``), multi-label classification dicts (``predictions`` is a
    mapping ``{class: {"confidence"}}``) and pydantic responses with ``model_dump()``.
    A missing class name becomes ``""`` and a missing confidence ``0.0``, as in the
    original block.

    Raises:
        TypeError: the input is not one of the shapes above, or a confidence is not a number.
        ValueError: a column has the wrong length or shape.

    Example:
        >>> to_batch(None) is None
        True
        >>> to_batch({"predictions": {"cat": {"confidence": 0.7}}}).class_names.tolist()
        ['cat']
        >>> to_batch(["not", "a", "prediction"])
        Traceback (most recent call last):
        ...
        TypeError: predictions: expected sv.Detections or a dict with 'predictions', got list
    """
    if predictions is None:
        return None
    if _is_detections(predictions):
        return _from_detections(predictions)
    if not isinstance(predictions, Mapping) and hasattr(predictions, "model_dump"):
        predictions = predictions.model_dump()
    if isinstance(predictions, Mapping):
        return _from_dict(predictions)
    raise TypeError(
        "predictions: expected sv.Detections or a dict with 'predictions', "
        f"got {type(predictions).__name__}"
    )


def _is_detections(value: object) -> bool:
    # Duck-typed so that `import mmagg` never needs supervision.
    return hasattr(value, "xyxy") and hasattr(value, "confidence") and hasattr(value, "data")


def _from_detections(detections: Any) -> PredictionBatch | None:
    xyxy = np.asarray(detections.xyxy)
    n = int(xyxy.shape[0]) if xyxy.ndim else 0
    if n == 0:
        return None
    data = detections.data if detections.data is not None else {}
    if type(data) is not dict and not isinstance(data, Mapping):  # the ABC check is slow
        raise TypeError(f"Detections.data: expected a dict of columns, got {type(data).__name__}")
    confidences = _confidence_column(detections.confidence, n)
    return PredictionBatch(
        class_names=_str_column(data, CLASS_NAME_DATA_FIELD, n),
        confidences=confidences,
        # Read only for the winning rows at the next fold: no copy (a frame's columns are
        # not rewritten by supervision once produced).
        inference_ids=_str_column(data, INFERENCE_ID_DATA_FIELD, n, copy=False),
        model_types=_str_column(data, PREDICTION_TYPE_DATA_FIELD, n, copy=False),
        class_ids=_class_id_column(getattr(detections, "class_id", None), n),
    )


def _class_id_column(raw: object, n: int) -> npt.NDArray[np.int64] | None:
    if raw is None:
        return None
    array = np.asarray(raw)
    if array.shape != (n,) or array.dtype.kind not in "iu":
        return None  # only a hint: without usable ids the window groups by name
    ids: npt.NDArray[np.int64] = array.astype(np.int64, copy=False)
    return ids


def _confidence_column(raw: object, n: int) -> FloatArray:
    if raw is None:
        return np.zeros(n, dtype=np.float64)
    array = np.asarray(raw)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"Detections.confidence: expected a numeric array, got dtype {array.dtype}")
    if array.shape != (n,):
        raise ValueError(f"Detections.confidence: expected shape ({n},), got {tuple(array.shape)}")
    return array.astype(np.float64, copy=True)


def _str_column(data: Mapping[str, Any], field: str, n: int, *, copy: bool = True) -> StrArray:
    raw = data.get(field)
    if raw is None:
        return _empty_strings(n)
    array: npt.NDArray[Any] = np.asarray(raw)
    if array.ndim == 0:
        return np.full(n, str(array.item()))
    if array.shape != (n,):
        raise ValueError(
            f"Detections.data[{field!r}]: expected shape ({n},), got {tuple(array.shape)}"
        )
    if array.dtype.kind == "U":
        column: StrArray = array.copy() if copy else array
        return column
    if array.dtype.kind == "O":
        # None in an object column means "missing", as in the original.
        array = np.where(np.equal(array, None), "", array)  # type: ignore[call-overload]
    return array.astype(np.str_)


_EMPTY: dict[int, StrArray] = {}


def _empty_strings(n: int) -> StrArray:
    """A shared read-only column of ``n`` empty strings (a missing column is common)."""
    column = _EMPTY.get(n)
    if column is None:
        column = np.full(n, "", dtype="<U1")
        column.setflags(write=False)
        if len(_EMPTY) < 4096:
            _EMPTY[n] = column
    return column


def _from_dict(response: Mapping[str, Any]) -> PredictionBatch | None:
    if "predictions" not in response:
        keys = sorted(map(str, response))[:8]
        raise ValueError(
            f"predictions: expected a dict with a 'predictions' key, got a dict with keys {keys}"
        )
    items = response["predictions"]
    inference_id = _optional_str(response, "inference_id", "predictions")
    model_type = _optional_str(response, "prediction_type", "predictions")
    names: list[str]
    scores: list[float]
    if isinstance(items, Mapping):  # multi-label classification
        names = []
        scores = []
        for name, details in items.items():
            where = f"predictions[{name!r}]"
            if not isinstance(details, Mapping):
                raise TypeError(
                    f"{where}: expected a dict with 'confidence', got {type(details).__name__}"
                )
            names.append(str(name))
            scores.append(_confidence(details, where))
        ids = [inference_id] * len(names)
    elif isinstance(items, Sequence) and not isinstance(items, (str, bytes)):
        names, scores, ids = [], [], []
        for index, item in enumerate(items):
            where = f"predictions[{index}]"
            if not isinstance(item, Mapping):
                raise TypeError(
                    f"{where}: expected a dict with 'class' and 'confidence', "
                    f"got {type(item).__name__}"
                )
            names.append(
                _optional_str(item, "class", where, _optional_str(item, "class_name", where))
            )
            scores.append(_confidence(item, where))
            ids.append(_optional_str(item, "inference_id", where, inference_id))
    elif items is None:
        return None
    else:
        raise TypeError(
            "predictions['predictions']: expected a list (single-label, detections) or a dict "
            f"(multi-label), got {type(items).__name__}"
        )
    if not names:
        return None
    return PredictionBatch(
        class_names=np.array(names, dtype=np.str_),
        confidences=np.array(scores, dtype=np.float64),
        inference_ids=np.array(ids, dtype=np.str_),
        model_types=np.full(len(names), model_type),
    )


def _optional_str(item: Mapping[str, Any], key: str, where: str, default: str = "") -> str:
    value = item.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"{where}.{key}: expected a string, got {type(value).__name__}")


def _confidence(item: Mapping[str, Any], where: str) -> float:
    value = item.get("confidence")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (Real, np.number)):
        raise TypeError(
            f"{where}.confidence: expected a number, got {type(value).__name__} {value!r:.40}"
        )
    # NaN/inf pass through here; the window refuses and counts them.
    return float(value)
