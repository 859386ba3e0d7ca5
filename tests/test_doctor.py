"""`llama-vision doctor`: one line per check, non-zero exit when something is wrong."""

import subprocess
import sys

from llama_vision_helpers.doctor import BAD, OK, run_doctor


def doctor(*args):
    result = subprocess.run([sys.executable, "-m", "llama_vision_helpers.cli", "doctor", *args],
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout.splitlines()


def test_doctor_on_a_cpu_seat_with_tiny_random(vlm):
    lines = []
    assert run_doctor("tiny-random", out=lines.append) == 0
    assert all(line[0] in (OK, BAD) for line in lines[:-1]) and lines[-1] == "all good"
    checked = [line.split(":")[0][2:] for line in lines[:-1]]
    assert {"Python", "torch", "transformers", "GPU", "disk", "input/"} <= set(checked)


def test_doctor_against_the_running_server(server):
    code, lines = doctor("--model", server.url)
    assert code == 0, lines
    answer = next(line for line in lines if line.startswith(f"{OK} answer:"))
    assert "round trip" in answer
    assert any(line.startswith(f"{OK} model: tiny-random is listed") for line in lines)


def test_doctor_against_an_unreachable_server_fails_and_says_what_to_do():
    code, lines = doctor("--model", "http://127.0.0.1:9/v1")
    assert code == 1
    server = next(line for line in lines if line.startswith(f"{BAD} server:"))
    assert "llama-vision serve" in server
    assert lines[-1] == "1 problem found"


def test_doctor_names_what_a_real_model_needs_on_a_cpu_seat():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CPU seat's report")
    lines = []
    assert run_doctor("unsloth/Llama-3.2-11B-Vision-Instruct-bnb-4bit", out=lines.append) == 1
    assert any(line.startswith(f"{BAD} GPU:") and "room server" in line for line in lines)
    assert any(line.startswith(f"{BAD} memory:") for line in lines)
    assert any(line.startswith(f"{OK} unsloth:") for line in lines)  # optional, and looked up without importing it
