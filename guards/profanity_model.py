"""The packaged `alt-profanity-check` model, computed without scikit-learn's per-call overhead.

The package's `predict_prob` is a `TfidfVectorizer` and a `CalibratedClassifierCV` (five
`LinearSVC`s, each with a sigmoid calibrator, averaged). For one short text it cost
milliseconds, nearly all of it scikit-learn's input validation (about a dozen `check_array`
passes, each probing for dataframe libraries), whatever the batch size (bench/NOTES.md); the guard
calls it on every input and every output, and it was most of a guarded request's CPU.

`LinearProfanityModel` reads the fitted parameters (the vocabulary and idf weights, each
classifier's coefficients and its calibrator's slope and offset) and computes the same
probability per text: l2-normalised tf-idf over the vectorizer's own analyzer, the five
decision values in one product, and the mean of `expit(-(a * d + b))`. It applies only when the
fitted objects have exactly that shape (else `of` returns None and the package's own call is
used); tests/guards/test_profanity.py compares both on every line of the eval sets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


class LinearProfanityModel:
    def __init__(
        self,
        analyzer: Callable[[str], list[str]],
        vocabulary: dict[str, int],
        idf: FloatArray,
        weights: FloatArray,
        intercepts: FloatArray,
        slopes: FloatArray,
        offsets: FloatArray,
    ) -> None:
        self._analyzer = analyzer
        self._vocabulary = vocabulary
        self._idf = idf
        self._weights = weights  # (features, classifiers)
        self._intercepts = intercepts
        self._slopes = slopes
        self._offsets = offsets

    @classmethod
    def of(cls, vectorizer: Any, model: Any) -> LinearProfanityModel | None:
        """The fast model for these fitted objects, or None when they are of another kind."""
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.svm import LinearSVC

        if not (
            isinstance(vectorizer, TfidfVectorizer)
            and not vectorizer.binary
            and vectorizer.norm == "l2"
            and vectorizer.use_idf
            and not vectorizer.sublinear_tf
            and isinstance(model, CalibratedClassifierCV)
            and list(model.classes_) == [0, 1]
        ):
            return None
        columns, intercepts, slopes, offsets = [], [], [], []
        for part in model.calibrated_classifiers_:
            est = part.estimator
            if (
                part.method != "sigmoid"
                or len(part.calibrators) != 1
                or not isinstance(est, LinearSVC)
                or est.coef_.shape[0] != 1
                or list(est.classes_) != [0, 1]
            ):
                return None
            columns.append(np.asarray(est.coef_[0], dtype=np.float64))
            intercepts.append(float(est.intercept_[0]))
            slopes.append(float(part.calibrators[0].a_))
            offsets.append(float(part.calibrators[0].b_))
        idf = np.asarray(vectorizer.idf_, dtype=np.float64)
        if len(columns) == 0 or columns[0].shape != idf.shape:
            return None
        return cls(
            vectorizer.build_analyzer(),
            dict(vectorizer.vocabulary_),
            idf,
            np.ascontiguousarray(np.stack(columns, axis=1)),
            np.asarray(intercepts),
            np.asarray(slopes),
            np.asarray(offsets),
        )

    def __call__(self, texts: list[str]) -> list[float]:
        return [self._probability(text) for text in texts]

    def _probability(self, text: str) -> float:
        vocabulary = self._vocabulary
        counts = Counter(
            index for token in self._analyzer(text) if (index := vocabulary.get(token)) is not None
        )
        decision = self._intercepts
        if counts:
            indices = np.fromiter(counts.keys(), dtype=np.intp, count=len(counts))
            tfidf = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
            tfidf *= self._idf[indices]
            tfidf /= np.sqrt(np.dot(tfidf, tfidf))
            decision = tfidf @ self._weights[indices] + self._intercepts
        calibrated = 1.0 / (1.0 + np.exp(self._slopes * decision + self._offsets))
        return float(calibrated.mean())
