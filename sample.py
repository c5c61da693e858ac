"""Sample a generator (one or K steps) or a teacher and evaluate metrics. `python sample.py --help` for options."""

from sid.cli import sample_main

if __name__ == "__main__":
    sample_main()
