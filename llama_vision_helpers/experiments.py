"""Run an experiment: ask every image of a task its questions, several samples each, parse, score, save.

A parse failure is a row scored 0 with the raw text kept; it never stops the run.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from .defaults import DEFAULT_SETTINGS
from .generation import describe_image
from .inputs import PROMPT_VARIANTS, TASKS, default_input_dir, load_ground_truth, question_prompt
from .model import VisionModel
from .scoring import score_answer

DEFAULT_TRIALS = 5
# Room for a complete answer of each kind; the tiny model always uses all of it, so tests pass less.
MAX_NEW_TOKENS = {"keywords": 256, "receipt": 768, "latex": 256, "clock": 48, "number": 96, "choice": 64, "order": 128}
# A worked answer needs more: the published step-by-step answers took up to 350 (ROCm blog, 90B, bf16).
STEP_BY_STEP_TOKENS = 384
# Sampling settings to compare: the reference walk-through's (DebuggerCafe 2024, 11B, bnb 4-bit) and greedy.
SETTING_PRESETS: dict[str, dict[str, Any]] = {
    "sampled": {k: v for k, v in DEFAULT_SETTINGS.items() if k != "max_new_tokens"},
    "greedy": {"do_sample": False},
}
CUSTOM_SETTING = "as given"  # the `setting` label of a run without presets
ROW_COLUMNS = ["task", "file", "question", "variant", "setting", "trial", "raw_answer", "parsed", "score", "correct",
               "error"]
TEXT_COLUMNS = ["task", "file", "question", "variant", "setting", "raw_answer", "error"]
NO_ANSWER = "(no answer found)"  # how a parse failure reads in a table (`display_table`)
NOT_APPLICABLE = ""  # a score detail that does not apply to the row (e.g. for an answer that could not be parsed)


def default_trials() -> int:
    """`$LLAMA_VISION_TRIALS` when set, else 5."""
    return int(os.environ.get("LLAMA_VISION_TRIALS", DEFAULT_TRIALS))


@dataclass
class ExperimentResult:
    """One row per answer (`rows`), a summary per file, question, prompt variant and setting (`summary`), and
    where they were saved."""

    task: str
    rows: pd.DataFrame
    summary: pd.DataFrame
    metadata: dict[str, Any]
    saved: list[Path] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Share of all answers that were correct."""
        return float(self.rows["correct"].mean()) if len(self.rows) else 0.0

    @property
    def table(self) -> pd.DataFrame:
        """The rows as a person reads them (see `display_table`)."""
        return display_table(self.rows)

    @property
    def comparison(self) -> pd.DataFrame:
        """Prompt variants against settings (see `compare`)."""
        return compare(self.rows)


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per file, question, prompt variant and setting: trials, mean score, share correct, share not parsed."""
    keys = ["file", "question", "variant", "setting"]
    if rows.empty:
        return pd.DataFrame(columns=[*keys, "trials", "mean_score", "accuracy", "parse_failures"])
    grouped = rows.groupby(keys, sort=False)
    return grouped.agg(
        trials=("trial", "count"),
        mean_score=("score", "mean"),
        accuracy=("correct", "mean"),
        parse_failures=("error", lambda e: float(e.notna().mean())),
    ).reset_index()


def compare(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt variant and setting: answers, share correct, mean score, share with no answer found."""
    columns = ["variant", "setting", "answers", "accuracy", "mean_score", "parse_failures"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    grouped = rows.groupby(["variant", "setting"], sort=False)
    return grouped.agg(
        answers=("trial", "count"),
        accuracy=("correct", "mean"),
        mean_score=("score", "mean"),
        parse_failures=("error", lambda e: float(e.notna().mean())),
    ).reset_index()[columns]


def _as_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def display_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows as shown to a person: the parsed answer as text, '(no answer found)' where none could be parsed,
    no error text where there was none, and score details that do not apply left blank (never 'nan')."""
    shown = canonical_rows(rows).astype(object)
    failed = shown["error"].notna() if "error" in shown else pd.Series(False, index=shown.index)
    if "parsed" in shown:
        shown["parsed"] = [NO_ANSWER if bad else _as_text(value) for bad, value in zip(failed, shown["parsed"])]
    return shown.where(shown.notna(), NOT_APPLICABLE)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def canonical_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with one spelling of 'missing': None in text and object columns and in columns with no value at all
    (whatever pandas guessed for them), NaN in number columns."""
    rows = rows.copy()
    for column in rows.columns:
        empty = all(_is_missing(v) for v in rows[column])
        if empty or not (pd.api.types.is_numeric_dtype(rows[column]) or pd.api.types.is_bool_dtype(rows[column])):
            rows[column] = pd.Series([None if _is_missing(v) else v for v in rows[column]], index=rows.index,
                                     dtype=object)
    return rows


def _json_safe(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def _encoded_for_csv(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows as CSV cells: text as text, numbers as numbers, anything else (parsed answers, lists, flags that may
    be missing) as JSON; a missing value is an empty cell."""
    out = canonical_rows(rows)
    for column in out.columns:
        if column in TEXT_COLUMNS or pd.api.types.is_numeric_dtype(out[column]) or pd.api.types.is_bool_dtype(out[column]):
            continue
        out[column] = ["" if v is None else json.dumps(_json_safe(v), ensure_ascii=False) for v in out[column]]
    return out


def save_results(result: ExperimentResult, results_dir: str | Path = "results") -> list[Path]:
    """Write the rows as CSV (read back by `load_results`) and everything (metadata, rows, summary) as JSON."""
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    meta = result.metadata
    stem = f"{result.task}-{_slug(meta['model_name'])}-{meta['date'].replace(':', '').replace('-', '')}"
    csv_path, json_path = folder / f"{stem}.csv", folder / f"{stem}.json"
    _encoded_for_csv(result.rows).to_csv(csv_path, index=False)
    payload = {
        "metadata": meta,
        "summary": result.summary.to_dict(orient="records"),
        "rows": json.loads(result.rows.to_json(orient="records", default_handler=str)),
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    return [csv_path, json_path]


def _decoded_column(cells: pd.Series) -> pd.Series:
    """A CSV column back to what it was: flags, whole numbers, numbers, else JSON cells (empty: missing)."""
    present = [c for c in cells if c != ""]
    complete = bool(present) and len(present) == len(cells)
    if complete and set(present) <= {"True", "False"}:
        return cells.map({"True": True, "False": False}).astype(bool)
    if complete and all(re.fullmatch(r"-?\d+", c) for c in present):
        return cells.astype("int64")
    try:
        return pd.Series([float(c) if c != "" else float("nan") for c in cells], index=cells.index, dtype=float)
    except ValueError:
        return pd.Series([json.loads(c) if c != "" else None for c in cells], index=cells.index, dtype=object)


def load_results(csv_path: str | Path) -> pd.DataFrame:
    """Read a results CSV written by `save_results` back into the same rows."""
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    rows = pd.DataFrame(index=raw.index)
    for column in raw.columns:
        cells = raw[column]
        if column == "raw_answer":
            rows[column] = cells  # an empty answer is an answer
        elif column in TEXT_COLUMNS:
            rows[column] = cells.replace("", None)
        elif column == "parsed":
            rows[column] = pd.Series([json.loads(c) if c != "" else None for c in cells], index=raw.index,
                                     dtype=object)
        else:
            rows[column] = _decoded_column(cells)
    return canonical_rows(rows)


def _chosen_files(truth: dict, task: str, files: list[str] | None) -> list[str]:
    chosen = [name for name, entry in truth.items() if entry["task"] == task]
    if files is not None:
        unknown = sorted(set(files) - set(chosen))
        if unknown:
            raise ValueError(f"Not {task} images: {', '.join(unknown)}; choose from {', '.join(chosen)}.")
        chosen = [name for name in chosen if name in files]
    return chosen


def _settings_runs(presets: list[str] | tuple[str, ...] | None, settings: dict[str, Any]) -> dict[str, dict]:
    if presets is None:
        return {CUSTOM_SETTING: dict(settings)}
    unknown = [p for p in presets if p not in SETTING_PRESETS]
    if unknown or not presets:
        raise ValueError(f"Unknown settings preset(s) {unknown or presets!r}; choose from {', '.join(SETTING_PRESETS)}.")
    return {name: {**SETTING_PRESETS[name], **settings} for name in presets}


def run_experiment(
    vlm: VisionModel,
    task: str,
    *,
    trials: int | None = None,
    seed: int = 0,
    files: list[str] | None = None,
    input_dir: str | Path | None = None,
    results_dir: str | Path | None = "results",
    progress: bool = True,
    variants: list[str] | tuple[str, ...] = ("short",),
    presets: list[str] | tuple[str, ...] | None = None,
    **settings: Any,
) -> ExperimentResult:
    """Ask every image of `task` its questions, `trials` samples each in one batched call per question.

    `variants`: the prompt variants to ask (`short`, `step_by_step`, `source`; see `inputs.PROMPT_VARIANTS`); a
    question without a variant is not asked in it. `presets`: names of `SETTING_PRESETS` to compare (`sampled`,
    the walk-through's temperature 1.5 / min_p 0.1, and `greedy`, one answer per question since greedy answers do
    not vary); None runs once with `settings` as given. `settings` go to `describe_image` (max_new_tokens,
    temperature, min_p, ...) in every run. Results are saved under `results_dir` (None: not saved).
    """
    from tqdm.auto import tqdm

    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    unknown = [v for v in variants if v not in PROMPT_VARIANTS]
    if unknown or not variants:
        raise ValueError(f"Unknown prompt variant(s) {unknown or variants!r}; choose from {', '.join(PROMPT_VARIANTS)}.")
    runs = _settings_runs(presets, settings)
    trials = default_trials() if trials is None else trials
    folder = Path(input_dir) if input_dir is not None else default_input_dir()
    truth = load_ground_truth(folder)["images"]
    chosen = _chosen_files(truth, task, files)

    records = []
    jobs = [(index, name, variant, label) for index, name in enumerate(chosen) for variant in variants for label in runs]
    for index, name, variant, label in tqdm(jobs, desc=task, unit="prompt set", disable=not progress):
        entry = truth[name]
        for number, question in enumerate(entry["questions"]):
            prompt = question_prompt(question, variant)
            if prompt is None:
                continue
            budget = STEP_BY_STEP_TOKENS if variant == "step_by_step" else MAX_NEW_TOKENS[question["kind"]]
            options = {"max_new_tokens": budget, **runs[label]}
            samples = trials if options.get("do_sample", True) else 1  # greedy answers do not vary
            answers = describe_image(vlm, folder / name, prompt, num_samples=samples,
                                     seed=seed + 1000 * index + number, stream=False, **options)  # same per variant
            answers = [answers] if isinstance(answers, str) else answers
            for trial, raw in enumerate(answers):
                parsed, score, error = score_answer(question, raw)
                records.append({
                    "task": task, "file": name, "question": question["id"], "variant": variant, "setting": label,
                    "trial": trial, "raw_answer": raw, "parsed": _json_safe(parsed), "score": score.value,
                    "correct": score.correct, "error": error,
                    **({"style": entry["style"]} if "style" in entry else {}), **score.details,
                })
    rows = canonical_rows(pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=ROW_COLUMNS))
    metadata = {
        "task": task, "model_name": vlm.model_name, "backend": vlm.backend, "random_weights": vlm.is_random,
        "trials": trials, "seed": seed, "settings": settings, "files": chosen, "variants": list(variants),
        "presets": {label: runs[label] for label in runs} if presets is not None else None,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    result = ExperimentResult(task, rows, summarize(rows), metadata)
    if results_dir is not None:
        result.saved = save_results(result, results_dir)
    return result


CLOCK_STYLES = ("analog", "digital")


def plot_clock_errors(rows: pd.DataFrame, axes=None, *, input_dir: str | Path | None = None):
    """Histograms of clock reading errors in minutes, analog and digital faces apart (ground truth says which).

    A panel where no time could be read from any answer says so in words instead of drawing an empty histogram.
    Returns the two axes.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)[1]
    if "style" in rows:
        styles = rows["style"]
    else:
        truth = load_ground_truth(input_dir)["images"]
        styles = rows["file"].map(lambda name: truth.get(name, {}).get("style"))
    for ax, style in zip(axes, CLOCK_STYLES):
        part = rows[styles == style]
        errors = part["error_minutes"].dropna() if "error_minutes" in part else pd.Series(dtype=float)
        ax.set_title(f"{style.capitalize()} faces: {len(errors)} of {len(part)} answers read")
        if errors.empty:
            message = (f"No time could be read from any of\nthe {len(part)} answers about {style} faces."
                       if len(part) else f"No {style} faces in these results.")
            ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.hist(errors, bins=range(0, 361, 15), color="#4c72b0", edgecolor="white")
        ax.set_xlabel("error in minutes on a 12-hour dial\n(0 = right, 360 = six hours off)")
        ax.set_ylabel("answers")
    return axes


def plot_comparison(comparison: pd.DataFrame, ax=None):
    """Share of correct answers (and of answers with no answer found) per prompt variant, one bar per setting."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, 3.5))[1]
    variants = list(dict.fromkeys(comparison["variant"]))
    settings = list(dict.fromkeys(comparison["setting"]))
    width = 0.8 / max(len(settings), 1)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#8172b3"]
    for i, setting in enumerate(settings):
        part = comparison[comparison["setting"] == setting].set_index("variant").reindex(variants)
        positions = [v + (i - (len(settings) - 1) / 2) * width for v in range(len(variants))]
        ax.bar(positions, part["accuracy"].fillna(0), width, color=colors[i % len(colors)], label=f"{setting}: correct")
        ax.bar(positions, part["parse_failures"].fillna(0), width, bottom=part["accuracy"].fillna(0),
               color=colors[i % len(colors)], alpha=0.3, hatch="//", label=f"{setting}: no answer found")
    ax.set_xticks(range(len(variants)), [v.replace("_", " ") for v in variants])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of answers")
    ax.set_xlabel("prompt variant")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    return ax


def plot_success_rates(summary: pd.DataFrame, ax=None, label: str = "file"):
    """Bar chart of the share of correct answers (and of unparseable ones) per file."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, 3.5))[1]
    positions = range(len(summary))
    ax.bar(positions, summary["accuracy"], color="#55a868", label="correct")
    ax.bar(positions, summary["parse_failures"], bottom=summary["accuracy"], color="#c44e52", alpha=0.6,
           label="no answer found")
    ax.set_xticks(list(positions), summary[label], rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of trials")
    ax.legend(frameon=False)
    return ax
