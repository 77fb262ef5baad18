"""Rule-based reference scores: VADER's compound score (vaderSentiment package)."""

from __future__ import annotations

from collections.abc import Sequence


def vader_compound(texts: Sequence[str]) -> list[float]:
    """VADER's compound score in [-1, 1] for each text (Hutto & Gilbert, 2014)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]
