"""eval.py and plot.py end to end on tiny models. Run: python -m pytest -q tests/test_eval.py"""
import json
import math
import os

import numpy as np
import pytest
import torch

import eval as ev
import plot
import udlm
from conftest import TINY
from test_math import Oracle, Uniform


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import write_corpus
    root = tmp_path_factory.mktemp("evalrun")
    corpus = write_corpus(root / "toy.txt")
    out = str(root / "run")
    assert udlm.main(["--data", corpus, "--cache_dir", str(root / "cache"), *TINY, "--max_steps", "3",
                      "--out_dir", out]) == 0
    return out


def records(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_recover_entropy_nelbo_and_score_commands(tiny_run):
    for cmd in ("recover", "entropy", "nelbo", "score"):
        assert ev.main([cmd, "--ckpt", tiny_run, "--rows", "8", "--steps", "8"]) == 0
    kinds = [r["kind"] for r in records(os.path.join(tiny_run, "eval.jsonl"))]
    assert kinds.count("recovery") == 10 and kinds.count("entropy_gap") == 1 and "nelbo" in kinds
    rec = [r for r in records(os.path.join(tiny_run, "eval.jsonl")) if r["kind"] == "recovery"]
    assert {r["split"] for r in rec} == {"train", "test"} and all(0 <= r["recovery"] <= 1 for r in rec)
    arrays = np.load(os.path.join(tiny_run, "recover.npz"))
    assert arrays["train_t0.25_x"].shape == (8, 32) and arrays["train_t0.25_entropy"].dtype == np.float32
    assert "### train row 0" in open(os.path.join(tiny_run, "examples.md")).read()
    ent = np.load(os.path.join(tiny_run, "entropy.npz"))
    assert ent["entropy_train"].shape == ent["entropy_generated"].shape == (8, 32)
    assert ent["trace_t"][0] == 1.0 and len(ent["trace_t"]) == 9
    score = [r for r in records(os.path.join(tiny_run, "eval.jsonl")) if r["kind"] == "sample_score"][0]
    assert score["scorer"].startswith("trigram") and score["ppl"] > 1


def test_measure_recovery_is_one_for_an_oracle_and_chance_for_a_uniform_denoiser():
    K, g = 64, torch.Generator().manual_seed(0)
    x = torch.randint(0, K - 1, (48, 40), generator=g).numpy()
    cfg = udlm.Config(vocab_size=K, length=40)  # measure_recovery reads K and the fields of a record
    data = dict(train=x, test=x)
    enc = udlm.get_tokenizer(512)
    recs, _, _ = ev.measure_recovery(Oracle(torch.from_numpy(x), K), cfg, data, enc, rows=48, steps=16)
    assert all(r["recovery"] == 1.0 for r in recs if r["kind"] == "recovery")
    recs, _, _ = ev.measure_recovery(Uniform(K), cfg, data, enc, ts=(1.0,), rows=48, steps=16)
    for r in (r for r in recs if r["kind"] == "recovery"):
        assert abs(r["recovery"] - 1 / K) < 3 * math.sqrt(1 / K / r["n_perturbed"]) + 0.005
        assert r["entropy_unrecovered"] == pytest.approx(math.log(K), rel=1e-5)


def test_trigram_scorer_is_normalised_and_prefers_seen_text():
    rng = np.random.default_rng(0)
    K = 12
    rows = rng.integers(0, K, (40, 16))
    scorer = ev.TrigramScorer(rows, K)
    for a, b in ((1, 2), (3, 3), (11, 0)):  # p(. | a, b) sums to one over the vocabulary
        probe = np.array([[a, b, c] for c in range(K)])
        assert np.exp(-scorer.nll(probe)).sum() == pytest.approx(1.0, abs=1e-9)
    assert scorer.perplexity(rows) < scorer.perplexity(rng.integers(0, K, (40, 16)))


def test_sweep_resumes_without_recomputation_and_plots(tmp_path, monkeypatch):
    from conftest import write_corpus
    corpus = write_corpus(tmp_path / "toy.txt")
    overrides = ev.parse_overrides([f"data={corpus}", f"cache_dir={tmp_path / 'cache'}", "max_steps=2",
                                    *(f"{k[2:]}={v}" for k, v in zip(TINY[::2], TINY[1::2]))])
    out = str(tmp_path / "sweep")
    results = ev.sweep(["cpu"], [0.1, 1.0], out, rows=8, steps=4, overrides=overrides, quiet=True)
    first = records(results)
    assert sum(r["kind"] == "done" for r in first) == 2
    assert {r["frac"] for r in first if r["kind"] == "recovery"} == {0.1, 1.0}
    fields = ("preset", "frac", "n_train_rows", "split", "t", "recovery", "unstable", "entropy_recovered",
              "entropy_unrecovered", "val_nelbo")
    assert all(all(k in r for k in fields) for r in first if r["kind"] == "recovery")
    n_rows = {r["frac"]: r["n_train_rows"] for r in first if r["kind"] == "done"}
    assert n_rows[0.1] == math.ceil(0.1 * n_rows[1.0])

    def no_training(*args, **kwargs):
        raise AssertionError("a finished point was recomputed")

    monkeypatch.setattr(udlm, "train", no_training)
    ev.sweep(["cpu"], [0.1, 1.0], out, rows=8, steps=4, overrides=overrides, quiet=True)
    assert records(results) == first
    # an interrupted point (records written, no 'done') restarts; the finished one is kept
    with open(results, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in first if not (r["kind"] == "done" and r["frac"] == 1.0))
    calls = []
    monkeypatch.setattr(udlm, "train", lambda cfg, **kw: calls.append(cfg.frac) or dict(train_s=0.0, steps=2))
    ev.sweep(["cpu"], [0.1, 1.0], out, rows=8, steps=4, overrides=overrides, quiet=True)
    assert calls == [1.0] and sum(r["kind"] == "done" for r in records(results)) == 2
    assert len(records(results)) == len(first)
    assert plot.main([out]) == 0
    for name in ("recovery_vs_frac", "entropy_hist", "entropy_trace", "entropy_gap", "sample_score",
                 "entropy_hist_cpu", "entropy_gap_hist_cpu"):
        assert os.path.getsize(os.path.join(out, f"{name}.png")) > 10000
