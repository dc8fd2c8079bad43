"""Shared fixtures. Run the suite with: python -m pytest -q tests"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A small model and corpus that train in about a second per run; every CLI test adds --out_dir.
TINY = ["--vocab_size", "512", "--length", "32", "--d_model", "32", "--d_cond", "32", "--n_blocks", "1",
        "--n_heads", "2", "--batch_size", "8", "--warmup", "2", "--eval_every", "1000", "--eval_rows", "16",
        "--sample_steps", "8", "--recovery_rows", "8", "--log_every", "1"]

WORDS = ("the nation congress people war peace law treasury year government states union trade army navy "
         "public duty citizens country power justice tax revenue land").split()


def write_corpus(path, n=600, seed=0):
    """n synthetic sentences, one per line (the --data FILE.txt format)."""
    import random
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + f" {i}.\n")
    return str(path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "toy.txt")


@pytest.fixture
def tiny_args(corpus, tmp_path):
    """CLI args for a tiny run on the toy corpus with a private cache dir."""
    return ["--data", corpus, "--cache_dir", str(tmp_path / "cache"), *TINY]
