"""`python app.py` (and Hugging Face Spaces): settings -> app -> launch."""
import sys

from assistant.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
