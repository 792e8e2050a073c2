"""PRL burden against a clinical outcome: ``prl-detect associate``.

The cohort's ``burden.csv`` (one row per patient) is joined with a clinical table (CSV or TSV, such as a
BIDS ``participants.tsv``), then:

* Spearman's rank correlation of the outcome with the PRL count and with the total PRL volume, with a
  95 % confidence interval from Fisher's z and the Bonett-Wright standard error ``sqrt((1 + ρ²/2)/(n − 3))``;
* ordinary least squares of the outcome on the PRL count and the covariates, with an intercept: estimates,
  standard errors from ``σ̂² (XᵀX)⁻¹``, two-sided t tests on ``n − p`` degrees of freedom, 95 % CIs, R².

The join key is ``case_id`` when the clinical table has that column, else ``participant_id`` (with
``session_id`` too when both tables have it), or the column named by ``id_column``. Empty cells, ``n/a`` and
``NA`` are missing: a patient missing any value used is left out, and the output says who and why. A
covariate of exactly two text values (``F``/``M``) is coded 0/1, the alphabetically first value being 0.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from PRLDetectorLib.errors import InputError

logger = logging.getLogger(__name__)

COUNT = "prl_count"
VOLUME = "total_volume_mm3"
MISSING = frozenset({"", "n/a", "na", "nan", "none", "null", "."})
_Z95 = 1.959963984540054


# --- statistics ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Correlation:
    predictor: str
    outcome: str
    rho: float
    p_value: float
    n: int
    ci95: tuple[float, float]

    def __str__(self) -> str:
        ci = "" if math.isnan(self.ci95[0]) else f" (95 % CI {self.ci95[0]:.2f} to {self.ci95[1]:.2f})"
        return f"rho = {self.rho:.2f}{ci}, {_p_is(self.p_value)}, n = {self.n}"

    def to_dict(self) -> dict:
        return {
            "predictor": self.predictor, "outcome": self.outcome, "rho": _json(self.rho),
            "p_value": _json(self.p_value), "n": self.n, "ci95": [_json(v) for v in self.ci95],
        }


def spearman(x: Sequence[float], y: Sequence[float], predictor: str = "x", outcome: str = "y") -> Correlation:
    """Spearman's ρ with its p value (scipy) and a Fisher-z 95 % CI (NaN for n ≤ 3)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = int(x.size)
    if n < 3:
        raise InputError(f"A correlation needs at least 3 patients; {n} have both {predictor} and {outcome}.")
    for name, values in ((predictor, x), (outcome, y)):
        if np.all(values == values[0]):
            raise InputError(f"Every patient has the same {name} ({values[0]:g}), so it cannot correlate with anything.")
    rho, p_value = stats.spearmanr(x, y)
    rho, p_value = float(rho), float(p_value)
    ci = (math.nan, math.nan)
    if n > 3 and abs(rho) < 1:
        half = _Z95 * math.sqrt((1 + rho * rho / 2) / (n - 3))
        z = math.atanh(rho)
        ci = (math.tanh(z - half), math.tanh(z + half))
    return Correlation(predictor, outcome, rho, p_value, n, ci)


@dataclass(frozen=True)
class Coefficient:
    term: str
    estimate: float
    std_error: float
    t: float
    p_value: float
    ci95: tuple[float, float]

    def to_dict(self) -> dict:
        return {
            "term": self.term, "estimate": self.estimate, "std_error": self.std_error, "t": self.t,
            "p_value": self.p_value, "ci95": list(self.ci95),
        }


@dataclass(frozen=True)
class LinearFit:
    outcome: str
    coefficients: tuple[Coefficient, ...]
    n: int
    df_residual: int
    r_squared: float
    adjusted_r_squared: float
    residual_std: float

    def __getitem__(self, term: str) -> Coefficient:
        for coefficient in self.coefficients:
            if coefficient.term == term:
                return coefficient
        raise KeyError(term)

    def to_dict(self) -> dict:
        return {
            "outcome": self.outcome, "n": self.n, "df_residual": self.df_residual,
            "r_squared": self.r_squared, "adjusted_r_squared": self.adjusted_r_squared,
            "residual_std": self.residual_std, "coefficients": [c.to_dict() for c in self.coefficients],
        }


def ordinary_least_squares(
    y: Sequence[float], predictors: dict[str, Sequence[float]], outcome: str = "y"
) -> LinearFit:
    """Fit ``y = b0 + Σ b_j x_j`` by least squares; t tests on ``n − p`` degrees of freedom."""
    y = np.asarray(y, dtype=float)
    names = ["intercept", *predictors]
    design = np.column_stack([np.ones_like(y), *(np.asarray(v, dtype=float) for v in predictors.values())])
    n, p = design.shape
    if n < p + 2:
        raise InputError(
            f"A regression on {p - 1} predictor(s) needs at least {p + 2} patients with all values; {n} have them."
        )
    if np.linalg.matrix_rank(design) < p:
        constant = [name for name, column in zip(names[1:], design.T[1:], strict=True) if np.ptp(column) == 0]
        if constant:
            raise InputError(f"Every patient has the same {constant[0]}, so its effect cannot be estimated; leave it out.")
        raise InputError(
            f"The predictors {', '.join(names[1:])} are collinear (one is a combination of the others); leave one out."
        )
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    residuals = y - design @ beta
    df = n - p
    sse = float(residuals @ residuals)
    sigma2 = sse / df
    covariance = sigma2 * np.linalg.inv(design.T @ design)
    std_errors = np.sqrt(np.diag(covariance))
    t_critical = float(stats.t.ppf(0.975, df))
    coefficients = []
    for name, estimate, se in zip(names, beta, std_errors, strict=True):
        t = float(estimate / se) if se > 0 else math.inf
        coefficients.append(Coefficient(
            name, float(estimate), float(se), t, float(2 * stats.t.sf(abs(t), df)),
            (float(estimate - t_critical * se), float(estimate + t_critical * se)),
        ))
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - sse / sst if sst > 0 else math.nan
    return LinearFit(
        outcome=outcome, coefficients=tuple(coefficients), n=n, df_residual=df, r_squared=r2,
        adjusted_r_squared=1 - (1 - r2) * (n - 1) / df, residual_std=math.sqrt(sigma2),
    )


# --- the cohort table ----------------------------------------------------------------------------------


@dataclass
class CohortData:
    """Patients with every value used, one array per column, in ``case_ids`` order."""

    case_ids: list[str]
    columns: dict[str, np.ndarray]
    excluded: dict[str, str] = field(default_factory=dict)
    """Patients left out, with the reason."""
    codings: dict[str, str] = field(default_factory=dict)
    """How a two-valued text covariate was coded, e.g. ``{"sex": "F = 0, M = 1"}``."""


def read_table(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV or TSV (tab-separated when the name ends in .tsv or the header has tabs)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The {what} table '{path}' does not exist; check the path.")
    text = path.read_text(encoding="utf-8-sig")
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in first else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    header = [name.strip() for name in reader.fieldnames or []]
    if not header:
        raise InputError(f"The {what} table '{path}' is empty; give a table with a header row.")
    rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return header, rows


def join_burden_clinical(
    burden_path: Path, clinical_path: Path, outcome: str, covariates: Sequence[str] = (), id_column: str | None = None
) -> CohortData:
    """One row per patient with PRL count, total volume, the outcome and the covariates, all numbers."""
    burden_header, burden_rows = read_table(burden_path, "burden")
    clinical_header, clinical_rows = read_table(clinical_path, "clinical")
    for column in (COUNT, VOLUME, "case_id"):
        if column not in burden_header:
            raise InputError(f"The burden table '{burden_path}' has no '{column}' column; give the burden.csv of a batch.")
    key = _join_key(burden_header, clinical_header, id_column, Path(clinical_path))
    wanted = [outcome, *covariates]
    missing = [c for c in wanted if c not in clinical_header]
    if missing:
        raise InputError(
            f"The clinical table '{Path(clinical_path).name}' has no column '{missing[0]}'; its columns are "
            f"{', '.join(clinical_header)}."
        )
    if outcome in covariates:
        raise InputError(f"'{outcome}' is both the outcome and a covariate; name it once.")
    clinical: dict[tuple[str, ...], dict[str, str]] = {}
    for row in clinical_rows:
        row_key = tuple(row.get(k, "") for k in key)
        if row_key in clinical:
            raise InputError(
                f"The clinical table has two rows for {'/'.join(row_key)}; give one row per patient."
            )
        clinical[row_key] = row

    data = CohortData(case_ids=[], columns={})
    raw: dict[str, list[str]] = {c: [] for c in (COUNT, VOLUME, *wanted)}
    matched: set[tuple[str, ...]] = set()
    for row in burden_rows:
        case_id = row["case_id"]
        row_key = tuple(row.get(k, "") for k in key)
        if row_key in matched:
            raise InputError(
                f"Several patients of the burden table match clinical row {'/'.join(row_key)} (several sessions?); "
                "add a case_id or session_id column to the clinical table."
            )
        found = clinical.get(row_key)
        if found is None:
            data.excluded[case_id] = "no row in the clinical table"
            continue
        matched.add(row_key)
        gaps = [c for c in wanted if found[c].lower() in MISSING]
        if gaps:
            data.excluded[case_id] = f"missing {', '.join(gaps)}"
            continue
        data.case_ids.append(case_id)
        raw[COUNT].append(row[COUNT])
        raw[VOLUME].append(row[VOLUME])
        for column in wanted:
            raw[column].append(found[column])
    unmatched = len(clinical) - len(matched)
    if unmatched:
        logger.info("%d clinical row(s) match no patient of the burden table.", unmatched)
    for column, values in raw.items():
        is_covariate = column in covariates
        data.columns[column], coding = _numbers(column, values, data.case_ids, is_covariate)
        if coding:
            data.codings[column] = coding
    if data.excluded:
        logger.info("Left out %d patient(s): %s", len(data.excluded), "; ".join(f"{k}: {v}" for k, v in data.excluded.items()))
    return data


def _join_key(burden_header: list[str], clinical_header: list[str], id_column: str | None, clinical: Path) -> tuple[str, ...]:
    if id_column:
        for name, header in (("burden", burden_header), ("clinical", clinical_header)):
            if id_column not in header:
                raise InputError(f"The {name} table has no column '{id_column}' to join on; name a column both tables have.")
        return (id_column,)
    if "case_id" in clinical_header:
        return ("case_id",)
    if "participant_id" in clinical_header and "participant_id" in burden_header:
        both_sessions = "session_id" in clinical_header and "session_id" in burden_header
        return ("participant_id", "session_id") if both_sessions else ("participant_id",)
    raise InputError(
        f"The clinical table '{clinical.name}' has neither a case_id nor a participant_id column to join with the "
        "burden table; add one or name the join column with --id-column."
    )


def _numbers(column: str, values: list[str], case_ids: list[str], covariate: bool) -> tuple[np.ndarray, str]:
    """Parse a column to floats; a covariate of exactly two text values becomes 0/1."""
    parsed = []
    text = []
    for case_id, value in zip(case_ids, values, strict=True):
        try:
            parsed.append(float(value))
        except ValueError:
            text.append((case_id, value))
            parsed.append(math.nan)
    if not text:
        return np.asarray(parsed, dtype=float), ""
    levels = sorted({value for _, value in text})
    if covariate and len(text) == len(values) and len(levels) == 2:
        return np.asarray([float(v == levels[1]) for v in values]), f"{levels[0]} = 0, {levels[1]} = 1"
    case_id, value = text[0]
    if covariate and len(text) == len(values):
        raise InputError(
            f"Covariate '{column}' has {len(levels)} text values ({', '.join(levels[:4])}); a text covariate "
            "must have exactly two, or code it as numbers."
        )
    raise InputError(f"Column '{column}' holds '{value}' for patient {case_id}, which is not a number; fix that cell.")


# --- the analysis --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Association:
    outcome: str
    covariates: tuple[str, ...]
    count: Correlation
    volume: Correlation
    regression: LinearFit
    excluded: dict[str, str]
    codings: dict[str, str]

    def format_table(self) -> str:
        fit = self.regression
        adjusted = f", adjusted for {', '.join(self.covariates)}" if self.covariates else ""
        lines = [f"Association of {self.outcome} with PRLs in {fit.n} patient(s)."]
        if self.excluded:
            lines.append(f"Left out {len(self.excluded)} patient(s): " + "; ".join(
                f"{case}: {reason}" for case, reason in sorted(self.excluded.items())))
        lines += [
            f"  Spearman, PRL count:         {self.count}",
            f"  Spearman, PRL total volume:  {self.volume}",
            "",
            f"Linear regression of {self.outcome} on PRL count{adjusted} "
            f"(R² = {fit.r_squared:.3f}, adjusted {fit.adjusted_r_squared:.3f}, {fit.df_residual} df):",
        ]
        rows = [("term", "estimate", "std. error", "95 % CI", "t", "p")]
        for c in fit.coefficients:
            rows.append((c.term, f"{c.estimate:.4g}", f"{c.std_error:.4g}", f"{c.ci95[0]:.4g} to {c.ci95[1]:.4g}",
                         f"{c.t:.2f}", _p(c.p_value)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            lines.append("  " + "  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True)]))
        for column, coding in self.codings.items():
            lines.append(f"  ({column} coded {coding})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "outcome": self.outcome, "covariates": list(self.covariates),
            "spearman_count": self.count.to_dict(), "spearman_volume": self.volume.to_dict(),
            "regression": self.regression.to_dict(), "excluded": self.excluded, "codings": self.codings,
        }


def associate(
    burden_path: Path, clinical_path: Path, outcome: str, covariates: Sequence[str] = (), id_column: str | None = None
) -> tuple[Association, CohortData]:
    """Spearman correlations and the adjusted regression; also the joined data (for the plot)."""
    covariates = tuple(covariates)
    if len(set(covariates)) != len(covariates):
        raise InputError("A covariate is named twice; name each once.")
    data = join_burden_clinical(burden_path, clinical_path, outcome, covariates, id_column)
    needed = len(covariates) + 4  # intercept, PRL count, covariates, and two degrees of freedom
    if len(data.case_ids) < needed:
        left_out = ""
        if data.excluded:
            case, reason = next(iter(data.excluded.items()))
            left_out = f" ({len(data.excluded)} left out, e.g. {case}: {reason})"
        raise InputError(
            f"A regression on {len(covariates) + 1} predictor(s) needs at least {needed} patients with all values; "
            f"{len(data.case_ids)} have them{left_out}."
        )
    y = data.columns[outcome]
    association = Association(
        outcome=outcome,
        covariates=covariates,
        count=spearman(data.columns[COUNT], y, "PRL count", outcome),
        volume=spearman(data.columns[VOLUME], y, "PRL total volume", outcome),
        regression=ordinary_least_squares(
            y, {COUNT: data.columns[COUNT], **{c: data.columns[c] for c in covariates}}, outcome
        ),
        excluded=data.excluded,
        codings=data.codings,
    )
    return association, data


def plot_association(association: Association, data: CohortData, out_path: Path) -> Path:
    """Outcome against PRL count and against total PRL volume, one point per patient, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = data.columns[association.outcome]
    count, volume = data.columns[COUNT], data.columns[VOLUME]
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, count.size)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110, constrained_layout=True)
    ax = axes[0]
    ax.scatter(count + jitter, y, s=22, color="#1f5fa8", alpha=0.8, edgecolors="none")
    fit = association.regression
    if not association.covariates:
        xs = np.linspace(count.min(), count.max(), 50)
        ax.plot(xs, fit["intercept"].estimate + fit[COUNT].estimate * xs, color="#c0392b", lw=1.5)
    slope = fit[COUNT]
    adjusted = " (adjusted)" if association.covariates else ""
    ax.set_title(
        f"Spearman {association.count.rho:.2f}, {_p_is(association.count.p_value)}\n"
        f"slope{adjusted} {slope.estimate:.3g} per PRL, {_p_is(slope.p_value)}",
        fontsize=9,
    )
    ax.set_xlabel("PRL count")
    ax.set_ylabel(association.outcome)
    ax = axes[1]
    ax.scatter(volume, y, s=22, color="#1f5fa8", alpha=0.8, edgecolors="none")
    ax.set_title(f"Spearman {association.volume.rho:.2f}, {_p_is(association.volume.p_value)}", fontsize=9)
    ax.set_xlabel("Total PRL volume (mm³)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{association.outcome} and PRL burden, n = {fit.n}", fontsize=10)
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def _p(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _p_is(value: float) -> str:
    text = _p(value)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def _json(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
