"""`python -m minigpt` runs the command line (this is also what torchrun launches)."""

from minigpt.cli import app

if __name__ == "__main__":
    app(prog_name="minigpt")
