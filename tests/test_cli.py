import os
import subprocess
import sys

import pytest


def run_cli(*args, stdin=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "llama_vision_helpers.cli", *args],
        capture_output=True, text=True, input=stdin, env=env, timeout=300,
    )


@pytest.fixture
def image_file(tmp_path, photo):
    path = tmp_path / "photo.png"
    photo.save(path)
    return path


def test_describe_streams_and_exits_0(vlm, image_file):
    result = run_cli("describe", str(image_file), "What is it?", "--model", "tiny-random",
                     "--max-new-tokens", "8", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and len(result.stdout) > 1


def test_describe_missing_file_exits_2_without_traceback(tmp_path):
    result = run_cli("describe", str(tmp_path / "missing.jpg"), "--model", "tiny-random")
    assert result.returncode == 2
    assert "missing.jpg" in result.stderr and "Traceback" not in result.stderr


def test_describe_rejects_bad_settings_with_exit_2(vlm, image_file):
    result = run_cli("describe", str(image_file), "--model", "tiny-random", "--max-new-tokens", "0")
    assert result.returncode == 2 and "max_new_tokens" in result.stderr and "Traceback" not in result.stderr


def test_chat_answers_each_line_until_an_empty_one(vlm, image_file):
    result = run_cli("chat", str(image_file), "--model", "tiny-random", "--max-new-tokens", "4", "--seed", "0",
                     stdin="What is it?\nAnd the colour?\n\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model> ") == 2
