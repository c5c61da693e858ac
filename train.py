"""Train a teacher or distill it with SiD. `python train.py --help` lists configs and keys."""

from sid.cli import train_main

if __name__ == "__main__":
    train_main()
