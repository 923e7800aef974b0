"""RULER scoring: lower-cased substring match of the references in the prediction."""
from __future__ import annotations

from vattn.errors import VattnError


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction of references found (niah, vt, cwe, fwe)."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers) if answers else 0.0


def string_match_part(prediction: str, answers: list[str]) -> float:
    """1 if any reference is found (qa)."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score(metric: str, prediction: str, answers: list[str]) -> float:
    if metric not in METRICS:
        raise VattnError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return METRICS[metric](prediction, answers)
