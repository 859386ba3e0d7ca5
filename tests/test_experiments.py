import json

import pytest

import pandas as pd

from llama_vision_helpers import experiments
from llama_vision_helpers.experiments import (
    NO_ANSWER, ROW_COLUMNS, SETTING_PRESETS, canonical_rows, display_table, load_results, plot_clock_errors,
    plot_comparison, plot_success_rates, run_experiment,
)
from llama_vision_helpers.inputs import PROMPT_VARIANTS, TASKS, load_ground_truth, question_prompt


@pytest.fixture(scope="module")
def results(vlm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    runs = {task: run_experiment(vlm, task, trials=2, max_new_tokens=12, progress=False, results_dir=folder)
            for task in TASKS}
    return runs, folder


def test_every_task_runs_and_every_answer_is_scored(results):
    runs, _ = results
    for task, result in runs.items():
        assert list(result.rows.columns[: len(ROW_COLUMNS)]) == ROW_COLUMNS
        assert len(result.rows) == 2 * sum(1 for _ in result.rows.groupby(["file", "question"]))
        assert set(result.rows["trial"]) == {0, 1}
        assert result.rows["raw_answer"].map(type).eq(str).all()
        assert result.rows["score"].between(0, 1).all()
        assert result.rows["correct"].map(type).eq(bool).all(), task
        failed = result.rows[result.rows["error"].notna()]
        assert failed["parsed"].isna().all() and (failed["score"] == 0).all()


def test_summary_has_one_row_per_file_and_question(results):
    runs, _ = results
    clock = runs["clock"]
    assert len(clock.summary) == clock.rows["file"].nunique()
    assert set(clock.summary.columns) == {"file", "question", "variant", "setting", "trials", "mean_score", "accuracy",
                                          "parse_failures"}
    assert (clock.summary["trials"] == 2).all()


def test_results_are_saved_with_their_settings(results):
    runs, folder = results
    csv_path, json_path = runs["latex"].saved
    assert csv_path.parent == folder and csv_path.suffix == ".csv"
    saved = json.loads(json_path.read_text())
    assert saved["metadata"]["model_name"] == "tiny-random" and saved["metadata"]["backend"] == "transformers"
    assert saved["metadata"]["settings"] == {"max_new_tokens": 12} and saved["metadata"]["trials"] == 2
    assert len(saved["rows"]) == len(runs["latex"].rows)


def test_one_batched_call_per_image_question(vlm, monkeypatch):
    calls = []
    original = vlm.model.generate
    monkeypatch.setattr(vlm.model, "generate", lambda *a, **k: calls.append(k) or original(*a, **k))
    run_experiment(vlm, "calculator", trials=3, max_new_tokens=4, progress=False, results_dir=None,
                   files=["calculator-1.png"])
    assert len(calls) == 3 and all(k["num_return_sequences"] == 3 for k in calls)


def test_unknown_task_and_files_are_refused(vlm):
    with pytest.raises(ValueError, match="Unknown task"):
        run_experiment(vlm, "poetry")
    with pytest.raises(ValueError, match="image_1.jpg"):
        run_experiment(vlm, "clock", files=["image_1.jpg"])


def test_plots_draw_from_results(results):
    runs, _ = results
    analog, digital = plot_clock_errors(runs["clock"].rows)
    rows = runs["clock"].rows
    assert analog.get_title().endswith(f"of {(rows['style'] == 'analog').sum()} answers read")
    assert digital.get_title().endswith(f"of {(rows['style'] == 'digital').sum()} answers read")
    ax = plot_success_rates(runs["latex"].summary)
    assert len(ax.patches) == 2 * len(runs["latex"].summary)


def _clock_rows(errors: dict[str, list]) -> pd.DataFrame:
    records = []
    for name, values in errors.items():
        for trial, minutes in enumerate(values):
            records.append({"file": name, "trial": trial, "error": None if minutes is not None else "no clock time",
                            "error_minutes": minutes})
    return pd.DataFrame.from_records(records)


def test_clock_plot_splits_analog_and_digital_by_ground_truth():
    rows = _clock_rows({"watch-face-2.jpg": [5, 30], "clock-analog-01.jpg": [None, 90],
                        "watch-face-1.jpg": [None, None]})
    analog, digital = plot_clock_errors(rows)
    assert analog.get_title() == "Analog faces: 3 of 4 answers read"
    assert sum(patch.get_height() for patch in analog.patches) == 3
    assert digital.get_title() == "Digital faces: 0 of 2 answers read"
    assert not digital.patches  # no histogram of nothing: it says so in words
    assert "No time could be read from any of\nthe 2 answers about digital faces." in [t.get_text() for t in digital.texts]


def test_clock_styles_come_from_ground_truth():
    truth = load_ground_truth()["images"]
    styles = {name: entry.get("style") for name, entry in truth.items() if entry["task"] == "clock"}
    assert set(styles.values()) == {"analog", "digital"}
    assert all(entry["description"].lower().startswith(style) for name, style in styles.items()
               for entry in [truth[name]])


def _tricky_rows() -> pd.DataFrame:
    """Rows as run_experiment makes them, with every kind of value a results file has to keep."""
    records = [
        {"task": "latex", "file": "equation-01.png", "question": "latex", "variant": "short", "setting": "sampled",
         "trial": 0, "raw_answer": 'Here, "quoted", with a comma\nand a new line: $$E = mc^2$$', "parsed": "E = mc^2",
         "score": 1.0, "correct": True, "error": None, "edit_distance": 0, "renders": True},
        {"task": "latex", "file": "equation-10.png", "question": "latex", "variant": "short", "setting": "sampled",
         "trial": 1, "raw_answer": "", "parsed": None, "score": 0.0, "correct": False,
         "error": "no LaTeX found in ''"},
        {"task": "clock", "file": "watch-face-1.jpg", "question": "time", "variant": "step_by_step",
         "setting": "greedy", "trial": 0, "raw_answer": "22:27", "parsed": [22, 27], "score": 0.5, "correct": False,
         "error": None, "keywords_found": ["a", "b"], "missing": [], "f1": 0.25},
        {"task": "receipt", "file": "receipt-1.jpeg", "question": "json", "variant": "short", "setting": "sampled",
         "trial": 0, "raw_answer": "{}", "parsed": {"store": "Corner Market", "total": 3.5}, "score": 896.0,
         "correct": False, "error": None},
    ]
    return canonical_rows(pd.DataFrame.from_records(records))


def test_results_csv_reads_back_with_the_same_rows(tmp_path):
    rows = _tricky_rows()
    result = experiments.ExperimentResult("latex", rows, experiments.summarize(rows),
                                          {"model_name": "tiny-random", "date": "2026-01-01T00:00:00Z"})
    csv_path, _ = experiments.save_results(result, tmp_path)
    pd.testing.assert_frame_equal(load_results(csv_path), rows)


def test_saved_experiment_reads_back_with_the_same_rows(results):
    runs, _ = results
    for task in ("latex", "receipt", "clock"):
        pd.testing.assert_frame_equal(load_results(runs[task].saved[0]), runs[task].rows)


def test_a_parse_failure_is_shown_plainly_never_as_nan():
    shown = display_table(_tricky_rows())
    assert shown.loc[1, "parsed"] == NO_ANSWER
    assert list(shown["parsed"][[0, 2, 3]]) == ["E = mc^2", "22, 27", "{'store': 'Corner Market', 'total': 3.5}"]
    assert shown.loc[0, "error"] == "" and shown.loc[1, "edit_distance"] == ""
    assert not shown.isna().any().any()
    assert not shown.astype(str).isin(["nan", "NaN", "None", "<NA>"]).any().any()


def test_prompt_variants_and_settings_are_compared(monkeypatch):
    calls = []

    def fake_describe_image(vlm, image, prompt, *, num_samples, **options):
        calls.append({"prompt": prompt, "num_samples": num_samples, **options})
        answers = [f"**{len(calls)}**"] * num_samples
        return answers if num_samples > 1 else answers[0]

    monkeypatch.setattr(experiments, "describe_image", fake_describe_image)
    vlm = type("FakeVLM", (), {"model_name": "fake", "backend": "none", "is_random": True})()
    result = run_experiment(vlm, "invoice", trials=3, progress=False, results_dir=None, variants=PROMPT_VARIANTS,
                            presets=("sampled", "greedy"))
    questions = load_ground_truth()["images"]["invoice.png"]["questions"]
    asked = [(q["id"], v) for q in questions for v in PROMPT_VARIANTS if question_prompt(q, v)]
    assert ("days_to_due", "source") in asked and ("total_due", "source") not in asked
    assert len(calls) == 2 * len(asked)
    by_setting = {s: [c for c in calls if c.get("do_sample") is (s == "sampled")] for s in ("sampled", "greedy")}
    assert all(c["num_samples"] == 3 and c["temperature"] == 1.5 and c["min_p"] == 0.1 for c in by_setting["sampled"])
    assert all(c["num_samples"] == 1 for c in by_setting["greedy"])
    assert sorted(c["prompt"] for c in by_setting["greedy"]) == sorted(
        question_prompt(q, v) for q in questions for v in PROMPT_VARIANTS if question_prompt(q, v))
    step = [c for c in calls if "step by step" in c["prompt"]]
    assert step and all(c["max_new_tokens"] == experiments.STEP_BY_STEP_TOKENS for c in step)
    assert len(result.rows) == 3 * len(asked) + len(asked)
    comparison = result.comparison
    assert list(zip(comparison["variant"], comparison["setting"])) == [
        (v, s) for v in PROMPT_VARIANTS for s in ("sampled", "greedy")]
    assert comparison["answers"].sum() == len(result.rows)
    ax = plot_comparison(comparison)
    assert len(ax.patches) == 2 * len(comparison)


def test_variants_and_presets_run_on_the_tiny_model(vlm):
    result = run_experiment(vlm, "charts", files=["chart-revenue.png"], trials=2, max_new_tokens=4, progress=False,
                            results_dir=None, variants=("short", "source"), presets=("sampled", "greedy"))
    assert len(result.rows) == 2 * 2 + 2
    assert set(result.rows["setting"]) == {"sampled", "greedy"} and set(result.rows["variant"]) == {"short", "source"}
    assert result.rows["raw_answer"].map(type).eq(str).all()


def test_unknown_variants_and_presets_are_refused(vlm):
    with pytest.raises(ValueError, match="step_by_step"):
        run_experiment(vlm, "charts", variants=("chatty",))
    with pytest.raises(ValueError, match="greedy"):
        run_experiment(vlm, "charts", presets=("hot",))
    assert set(SETTING_PRESETS) == {"sampled", "greedy"}


def _truth_as_parsed(question: dict):
    """The ground truth in the form the parser would hand the scorer."""
    truth = question["answer"]
    if question["kind"] == "clock":
        return truth["hour"], truth["minute"]
    if question["kind"] == "keywords":
        return " ".join(truth)
    return truth


def test_detail_keys_are_what_each_scorer_reports():
    from llama_vision_helpers.scoring import DETAIL_KEYS, score_parsed

    kinds = set()
    for entry in load_ground_truth()["images"].values():
        for question in entry["questions"]:
            kinds.add(question["kind"])
            details = score_parsed(question, _truth_as_parsed(question)).details
            assert set(details) == set(DETAIL_KEYS[question["kind"]]), question["id"]
    assert kinds == set(DETAIL_KEYS)


def test_a_model_that_never_answers_still_gives_every_column(vlm, monkeypatch, tmp_path):
    """Random weights can answer nothing at all; the task's detail columns are there, empty, and read back so."""
    from llama_vision_helpers.scoring import DETAIL_KEYS

    def silent(vlm, image, prompt, *, num_samples=1, **settings):
        return [""] * num_samples if num_samples > 1 else ""

    monkeypatch.setattr(experiments, "describe_image", silent)
    for task in TASKS:
        result = run_experiment(vlm, task, trials=2, progress=False, results_dir=tmp_path)
        rows = result.rows
        pd.testing.assert_frame_equal(load_results(result.saved[0]), rows)
        kinds = {q["kind"] for e in load_ground_truth()["images"].values() if e["task"] == task for q in e["questions"]}
        for kind in kinds:
            assert set(DETAIL_KEYS[kind]) <= set(rows.columns), (task, kind)
