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

from .generation import describe_image
from .inputs import TASKS, default_input_dir, load_ground_truth
from .model import VisionModel
from .scoring import score_answer

DEFAULT_TRIALS = 5
# Room for a complete answer of each kind; the tiny model always uses all of it, so tests pass less.
MAX_NEW_TOKENS = {"keywords": 256, "receipt": 768, "latex": 256, "clock": 48, "number": 96, "choice": 64, "order": 128}
ROW_COLUMNS = ["task", "file", "question", "trial", "raw_answer", "parsed", "score", "correct", "error"]


def default_trials() -> int:
    """`$LLAMA_VISION_TRIALS` when set, else 5."""
    return int(os.environ.get("LLAMA_VISION_TRIALS", DEFAULT_TRIALS))


@dataclass
class ExperimentResult:
    """One row per answer (`rows`), a summary per file and question (`summary`), and where they were saved."""

    task: str
    rows: pd.DataFrame
    summary: pd.DataFrame
    metadata: dict[str, Any]
    saved: list[Path] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Share of all answers that were correct."""
        return float(self.rows["correct"].mean()) if len(self.rows) else 0.0


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per file and question: trials, mean score, share correct, share that could not be parsed."""
    if rows.empty:
        return pd.DataFrame(columns=["file", "question", "trials", "mean_score", "accuracy", "parse_failures"])
    grouped = rows.groupby(["file", "question"], sort=False)
    return grouped.agg(
        trials=("trial", "count"),
        mean_score=("score", "mean"),
        accuracy=("correct", "mean"),
        parse_failures=("error", lambda e: float(e.notna().mean())),
    ).reset_index()


def _json_safe(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def save_results(result: ExperimentResult, results_dir: str | Path = "results") -> list[Path]:
    """Write the rows as CSV and everything (metadata, rows, summary) as JSON; return the paths."""
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    meta = result.metadata
    stem = f"{result.task}-{_slug(meta['model_name'])}-{meta['date'].replace(':', '').replace('-', '')}"
    csv_path, json_path = folder / f"{stem}.csv", folder / f"{stem}.json"
    result.rows.to_csv(csv_path, index=False)
    payload = {
        "metadata": meta,
        "summary": result.summary.to_dict(orient="records"),
        "rows": json.loads(result.rows.to_json(orient="records", default_handler=str)),
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    return [csv_path, json_path]


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
    **settings: Any,
) -> ExperimentResult:
    """Ask every image of `task` its questions, `trials` samples each in one batched call per question.

    `settings` go to `describe_image` (max_new_tokens, temperature, min_p, ...). Results are saved under
    `results_dir` (None: not saved). Returns an `ExperimentResult`.
    """
    from tqdm.auto import tqdm

    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    trials = default_trials() if trials is None else trials
    folder = Path(input_dir) if input_dir is not None else default_input_dir()
    truth = load_ground_truth(folder)["images"]
    chosen = [name for name, entry in truth.items() if entry["task"] == task]
    if files is not None:
        unknown = sorted(set(files) - set(chosen))
        if unknown:
            raise ValueError(f"Not {task} images: {', '.join(unknown)}; choose from {', '.join(chosen)}.")
        chosen = [name for name in chosen if name in files]

    records = []
    for index, name in enumerate(tqdm(chosen, desc=task, unit="image", disable=not progress)):
        for number, question in enumerate(truth[name]["questions"]):
            options = {"max_new_tokens": MAX_NEW_TOKENS[question["kind"]], **settings}
            answers = describe_image(vlm, folder / name, question["prompt"], num_samples=trials,
                                     seed=seed + 1000 * index + number, stream=False, **options)
            answers = [answers] if isinstance(answers, str) else answers
            for trial, raw in enumerate(answers):
                parsed, score, error = score_answer(question, raw)
                records.append({
                    "task": task, "file": name, "question": question["id"], "trial": trial, "raw_answer": raw,
                    "parsed": _json_safe(parsed), "score": score.value, "correct": score.correct, "error": error,
                    **score.details,
                })
    rows = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=ROW_COLUMNS)
    metadata = {
        "task": task, "model_name": vlm.model_name, "backend": vlm.backend, "random_weights": vlm.is_random,
        "trials": trials, "seed": seed, "settings": settings, "files": chosen,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    result = ExperimentResult(task, rows, summarize(rows), metadata)
    if results_dir is not None:
        result.saved = save_results(result, results_dir)
    return result


def plot_clock_errors(rows: pd.DataFrame, ax=None):
    """Histogram of clock reading errors in minutes (parse failures counted apart in the title)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    errors = rows["error_minutes"].dropna() if "error_minutes" in rows else pd.Series(dtype=float)
    failures = int(rows["error"].notna().sum()) if "error" in rows else 0
    ax.hist(errors, bins=range(0, 361, 15), color="#4c72b0", edgecolor="white")
    ax.set_xlabel("error in minutes on a 12-hour dial (0 = right, 360 = six hours off)")
    ax.set_ylabel("answers")
    ax.set_title(f"Clock reading errors: {len(errors)} answers read, {failures} with no time in them")
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
