"""The defaults a user meets first, in one place: the model, the backends, the question, the sampling settings.

Everything else (library, CLI, app, benchmark) imports them from here.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MODEL = "unsloth/Llama-3.2-11B-Vision-Instruct-bnb-4bit"
TINY_ALIAS = "tiny-random"
# "auto" picks unsloth on a GPU where it is installed, else transformers (model.choose_backend).
BACKENDS = ("auto", "unsloth", "transformers")

# The question asked when none is given (an image sent on its own).
DEFAULT_INSTRUCTION = "Describe the image accurately."

# The reference walk-through's sampling settings (DebuggerCafe 2024, 11B Instruct, bnb 4-bit via unsloth).
DEFAULT_SETTINGS: dict[str, Any] = {"max_new_tokens": 1024, "temperature": 1.5, "min_p": 0.1, "do_sample": True}
