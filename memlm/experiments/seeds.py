"""Statistics over repeated runs (seeds): mean and standard error per metric, and the standard errors of a ratio and
a difference of two such means. Shared by the variant ladder (``eval/compare.py --seeds``), the capacity ladder
(``eval/capacity.py``) and the continual sweep's frontier."""

from __future__ import annotations

import math
from typing import Any


def mean_se(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, standard error of the mean, n) over the values that are not None; SE is None for n < 2."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return None, None, 0
    m = sum(xs) / n
    if n < 2:
        return m, None, n
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n), n


def aggregate(per_seed: list[dict[str, Any]], keys: list[str] | None = None) -> dict[str, Any]:
    """Per numeric metric ``{"mean", "se", "n"}`` over the seeds' metric dicts (``keys``: only these)."""
    keys = keys or sorted({k for d in per_seed for k, v in d.items() if v is None or _number(v)})
    out = {}
    for k in keys:
        m, se, n = mean_se([d.get(k) if _number(d.get(k)) else None for d in per_seed])
        out[k] = {"mean": m, "se": se, "n": n}
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# two-sided 95 % quantiles of Student's t by degrees of freedom (a fractional df is rounded down: conservative)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}  # fmt: skip


def t975(df: float) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (1.96 beyond the table)."""
    if not df or df < 1:
        return float("inf")
    below = [d for d in T975 if d <= df]
    return T975[max(below)] if df <= 60 else 1.96


def ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """a / b of two ``{"mean", "se"}`` aggregates of independent runs, with the first-order (delta-method) standard
    error ``|a/b| * sqrt((se_a/a)^2 + (se_b/b)^2)``; None where b's mean is 0 or missing."""
    ma, mb = a.get("mean"), b.get("mean")
    if ma is None or not mb:
        return {"mean": None, "se": None}
    r = ma / mb
    sa, sb = a.get("se"), b.get("se")
    if sa is None or sb is None:
        return {"mean": r, "se": None}
    if ma == 0:  # the first-order SE of a/b at a = 0
        return {"mean": r, "se": sa / abs(mb)}
    return {"mean": r, "se": abs(r) * math.sqrt((sa / ma) ** 2 + (sb / mb) ** 2)}


def difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """a - b of two independent aggregates (``{"mean", "se", "n"}``), SE ``sqrt(se_a^2 + se_b^2)``, and ``level``:
    True when the difference is not resolved at 95 % (Welch's t test: |a - b| <= t_{0.975, df} SE with the
    Welch-Satterthwaite df; with 3 seeds a side t is ~2.8-4.3, not 2). "Level" means "no ranking", not "equal"."""
    ma, mb = a.get("mean"), b.get("mean")
    if ma is None or mb is None:
        return {"mean": None, "se": None, "level": None}
    sa, sb = a.get("se"), b.get("se")
    if sa is None or sb is None:
        return {"mean": ma - mb, "se": None, "level": None}
    se = math.sqrt(sa**2 + sb**2)
    na, nb = a.get("n") or 2, b.get("n") or 2
    num, den = se**4, (sa**4 / (na - 1) if na > 1 else 0) + (sb**4 / (nb - 1) if nb > 1 else 0)
    df = round(num / den, 6) if den > 0 else float("inf")
    return {"mean": ma - mb, "se": se, "df": df, "level": abs(ma - mb) <= t975(df) * se if se > 0 else ma == mb}


def fmt_pm(agg: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
    """``"12.3 ± 0.4"`` (mean ± SE, times ``scale``); ``"-"`` when missing, no ``±`` with one seed."""
    if not agg or agg.get("mean") is None:
        return "-"
    s = f"{scale * agg['mean']:.{digits}f}"
    return s if agg.get("se") is None else f"{s} ± {scale * agg['se']:.{digits}f}"
