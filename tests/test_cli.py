import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # every control character but tab and newline


def run_cli(*args, stdin=None, warnings="ignore"):
    env = {**os.environ, "PYTHONWARNINGS": warnings}
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
                     "--max-new-tokens", "8", "--seed", "0", warnings="default")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and len(result.stdout) > 1
    # the package's own advice is one line, without Python's file, line and source of the call
    assert "llama-vision: note: tiny-random is a tiny model" in result.stderr
    assert "UserWarning" not in result.stderr


def test_the_room_address_of_an_ipv6_host_is_a_valid_url():
    from llama_vision_helpers.cli import room_url

    assert room_url("::1", 8000) == "http://[::1]:8000/v1" and room_url("127.0.0.1", 80) == "http://127.0.0.1:80/v1"


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


def in_process(monkeypatch, capsys, vlm, *args):
    """Run `llama-vision ARGS` in this process on the session's tiny model; (exit code, stdout, stderr)."""
    from llama_vision_helpers import cli

    monkeypatch.setattr(cli, "_load", lambda parsed: vlm)
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_temperature_zero_means_greedy(monkeypatch, capsys, vlm, image_file):
    from llama_vision_helpers.cli import build_parser, sampling_settings

    settings = sampling_settings(build_parser().parse_args(["describe", "x.png", "--temperature", "0"]))
    assert settings["do_sample"] is False
    code, out, err = in_process(monkeypatch, capsys, vlm, "describe", str(image_file), "--temperature", "0",
                                "--max-new-tokens", "6")
    assert code == 0, err
    again = in_process(monkeypatch, capsys, vlm, "describe", str(image_file), "--greedy", "--max-new-tokens", "6")
    assert again[1] == out


@pytest.mark.parametrize("flags, word", [(["--min-p", "2"], "min_p"), (["--temperature", "-1"], "--greedy"),
                                         (["--max-new-tokens", "0"], "max_new_tokens")])
def test_bad_values_are_reported_before_the_model_loads(monkeypatch, capsys, image_file, flags, word):
    from llama_vision_helpers import cli

    def no_loading(args):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(cli, "_load", no_loading)
    for command in ("describe", "chat"):
        assert cli.main([command, str(image_file), *flags]) == 2
        err = capsys.readouterr().err
        assert word in err and "Traceback" not in err


def test_chat_with_a_closed_stdin_says_so_without_a_traceback(image_file):
    result = subprocess.run(
        [sys.executable, "-m", "llama_vision_helpers.cli", "chat", str(image_file), "--model", "tiny-random"],
        capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"}, preexec_fn=lambda: os.close(0),
    )
    assert result.returncode == 2 and "standard input" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_default_model_without_a_gpu_is_explained_in_flags(monkeypatch, capsys, image_file):
    from llama_vision_helpers import cli
    from llama_vision_helpers import model as model_module

    monkeypatch.delenv("LLAMA_VISION_MODEL", raising=False)
    monkeypatch.setattr(model_module, "gpu_available", lambda: False)
    assert cli.main(["describe", str(image_file), "--backend", "transformers"]) == 2
    err = capsys.readouterr().err
    assert "--model tiny-random" in err and "load_model(" not in err and "backend=" not in err


def test_control_characters_from_the_model_never_reach_the_terminal_raw(monkeypatch, capsys, vlm):
    """Any model (a server, Ollama, a real checkpoint) can answer with escape sequences; the CLI shows them escaped."""
    answer = ["Clear \x1b[2J", "the screen\x07 and", " keep\tthis\n"]

    def streaming_answer(vlm, image, instruction, *, stream, **settings):
        for chunk in answer:
            stream(chunk)
        return "".join(answer)

    monkeypatch.setattr("llama_vision_helpers.generation.describe_image", streaming_answer)
    code, out, err = in_process(monkeypatch, capsys, vlm, "describe", str(ROOT / "input" / "image_2.jpg"), "Hi")
    assert code == 0, err
    assert not CONTROL.search(out)
    assert "Clear \\x1b[2J" in out and "screen\\x07 and" in out and "keep\tthis\n" in out


def test_a_bug_is_not_reported_as_a_user_mistake(monkeypatch):
    from llama_vision_helpers import cli

    def buggy(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(cli, "cmd_fit", buggy)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["fit", "11b"])


def test_flags_take_their_defaults_from_the_one_place(monkeypatch):
    from llama_vision_helpers.cli import build_parser
    from llama_vision_helpers.defaults import BACKENDS, DEFAULT_SETTINGS

    monkeypatch.setitem(DEFAULT_SETTINGS, "temperature", 0.77)
    monkeypatch.setitem(DEFAULT_SETTINGS, "min_p", 0.033)
    monkeypatch.setitem(DEFAULT_SETTINGS, "max_new_tokens", 99)
    args = build_parser().parse_args(["describe", "x.png"])
    assert (args.temperature, args.min_p, args.max_new_tokens) == (0.77, 0.033, 99)
    backend = next(a for a in build_parser()._subparsers._group_actions[0].choices["chat"]._actions
                   if a.dest == "backend")
    assert tuple(backend.choices) == BACKENDS


def test_sampling_flags_reach_generate_unchanged(monkeypatch, capsys, vlm, image_file):
    calls = []
    original = vlm.model.generate
    monkeypatch.setattr(vlm.model, "generate", lambda *a, **k: calls.append(k) or original(*a, **k))
    code, _, err = in_process(monkeypatch, capsys, vlm, "describe", str(image_file), "--temperature", "0.3",
                              "--min-p", "0.05", "--max-new-tokens", "3", "--seed", "1")
    assert code == 0, err
    assert (calls[0]["temperature"], calls[0]["min_p"], calls[0]["max_new_tokens"]) == (0.3, 0.05, 3)
