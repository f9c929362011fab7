"""The packaged `alt-profanity-check` model, computed without scikit-learn's per-call overhead.

The package's `predict_prob` is a `TfidfVectorizer` and a `CalibratedClassifierCV` (five
`LinearSVC`s, each with a sigmoid calibrator, averaged). For one short text it cost
milliseconds, nearly all of it scikit-learn's input validation (about a dozen `check_array`
passes, each probing for dataframe libraries), whatever the batch size (bench/NOTES.md); the guard
calls it on every input and every output, and it was most of a guarded request's CPU.

`LinearProfanityModel` reads the fitted parameters (the vocabulary and idf weights, each
classifier's coefficients and its calibrator's slope and offset) and computes the same
probability per text: l2-normalised tf-idf over the vectorizer's own analyzer (for single
words its tokenizer alone), the five decision values, and the mean of `expit(-(a * d + b))`, with
one pass of array operations for a whole batch (a streamed check brings a few short sentences,
and array calls per text cost more than their arithmetic). It applies only when the
fitted objects have exactly that shape (else `of` returns None and the package's own call is
used); tests/guards/test_profanity.py compares both on every line of the eval sets.
"""

from __future__ import annotations

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
            _word_tokens(vectorizer),
            dict(vectorizer.vocabulary_),
            idf,
            np.ascontiguousarray(np.stack(columns, axis=1)),
            np.asarray(intercepts),
            np.asarray(slopes),
            np.asarray(offsets),
        )

    def __call__(self, texts: list[str]) -> list[float]:
        """The probability of each text."""
        vocabulary = self._vocabulary
        indices: list[int] = []  # the known tokens of all texts, text after text
        counts: list[int] = []
        owners: list[int] = []  # which text each entry of `indices` belongs to
        for i, text in enumerate(texts):
            found: dict[int, int] = {}
            for token in self._analyzer(text):
                index = vocabulary.get(token)
                if index is not None:
                    found[index] = found.get(index, 0) + 1
            indices.extend(found)
            counts.extend(found.values())
            owners.extend([i] * len(found))
        # Per text: l2-normalised tf-idf, then the five decision values (sums per owner; a text
        # with no known token keeps the intercepts).
        at = np.asarray(indices, dtype=np.intp)
        owner = np.asarray(owners, dtype=np.intp)
        tfidf = np.asarray(counts, dtype=np.float64) * self._idf[at]
        norms = np.sqrt(np.bincount(owner, tfidf * tfidf, minlength=len(texts)))
        tfidf /= norms[owner]
        terms = tfidf[:, None] * self._weights[at]  # (entries, classifiers)
        width = terms.shape[1]
        cells = (owner[:, None] * width + np.arange(width)).ravel()  # (text, classifier) cells
        sums = np.bincount(cells, weights=terms.ravel(), minlength=len(texts) * width)
        decisions = sums.reshape(len(texts), width) + self._intercepts
        calibrated = 1.0 / (1.0 + np.exp(self._slopes * decisions + self._offsets))
        # The mean over classifiers (as `ndarray.mean` computes it, without its call overhead).
        return (np.add.reduce(calibrated, axis=1) / width).tolist()  # type: ignore[no-any-return]


def _word_tokens(vectorizer: Any) -> Callable[[str], list[str]]:
    """The vectorizer's analyzer, or, for single words (the package's shape), its preprocessor
    and tokenizer alone: the stop words it would then drop are not in the vocabulary (checked),
    so looking them up finds nothing, as dropping them would."""
    analyzer: Callable[[str], list[str]] = vectorizer.build_analyzer()
    stop_words = vectorizer.get_stop_words() or ()
    if (
        vectorizer.analyzer == "word"
        and tuple(vectorizer.ngram_range) == (1, 1)
        and vectorizer.input == "content"
        and not set(stop_words) & vectorizer.vocabulary_.keys()
    ):
        preprocess = vectorizer.build_preprocessor()
        tokenize = vectorizer.build_tokenizer()

        def words(text: str) -> list[str]:
            return tokenize(preprocess(text))  # type: ignore[no-any-return]

        return words
    return analyzer
