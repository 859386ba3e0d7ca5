"""Start the chat app: python app.py [--model tiny-random] [--host 0.0.0.0] [--port 7860] [--share]"""

import sys

from llama_vision_helpers.app import main

if __name__ == "__main__":
    sys.exit(main())
