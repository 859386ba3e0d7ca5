import json

import pytest

from llama_vision_helpers.experiments import ROW_COLUMNS, plot_clock_errors, plot_success_rates, run_experiment
from llama_vision_helpers.inputs import TASKS


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
    assert set(clock.summary.columns) == {"file", "question", "trials", "mean_score", "accuracy", "parse_failures"}
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
    ax = plot_clock_errors(runs["clock"].rows)
    assert "answers read" in ax.get_title()
    ax = plot_success_rates(runs["latex"].summary)
    assert len(ax.patches) == 2 * len(runs["latex"].summary)
