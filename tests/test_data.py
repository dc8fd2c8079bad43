"""Tokenizer and data pipeline. Run: python -m pytest -q tests/test_data.py"""
import math
import os

import numpy as np
import pytest

import udlm
from conftest import ROOT

SHARED_LM1B = os.path.join(os.path.dirname(ROOT), "shared", "data", "lm1b", "hf_datasets_dummy")


def test_gpt2_tokenizer_offline_round_trip():
    enc = udlm.get_tokenizer(50257)
    assert enc.encode("Hello world") == [15496, 995] and enc.n_vocab == 50257 and enc.eot_token == 50256
    text = "The Union's state is strong — 12 % naïve café, ünïcödé ✓."
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_truncated_vocabulary_is_a_valid_bpe_that_grows_token_counts():
    sents = udlm.load_sentences(udlm.make_config())[0][:4000]
    counts = {}
    for K in (50257, 8192, 4096):
        enc = udlm.get_tokenizer(K)
        ids = enc.encode_ordinary_batch(sents)
        assert max(max(t) for t in ids) < K - 1 and enc.eot_token == K - 1 and enc.n_vocab == K
        assert all(enc.decode(t) == s for t, s in zip(ids[:200], sents))
        counts[K] = sum(map(len, ids))
    assert 1.12 < counts[8192] / counts[50257] < 1.25  # the issue's ~1.18x
    assert 1.28 < counts[4096] / counts[50257] < 1.42  # ~1.34x


def test_tokenizer_files_are_hash_checked(monkeypatch):
    monkeypatch.setitem(udlm.GPT2_FILES, "vocab.bpe", "0" * 64)
    udlm._gpt2_ranks.cache_clear()
    try:
        with pytest.raises(udlm.UsageError, match="sha256"):
            udlm._gpt2_ranks()
    finally:
        udlm._gpt2_ranks.cache_clear()


def test_sotu_corpus_sentences_and_deterministic_split():
    train, test, corpus_id = udlm.load_sentences(udlm.make_config())
    assert 60000 < len(train) + len(test) < 80000
    assert 0.04 < len(test) / (len(train) + len(test)) < 0.06 and not set(train) & set(test)
    assert udlm.load_sentences(udlm.make_config(frac=0.01)) == (train, test, corpus_id)
    assert all(s[-1] in ".!?\"')" and len(s.split()) >= 4 for s in train[:1000])


def test_split_sentences():
    text = 'Fellow-Citizens of the Senate:\n\nWe met here today. [Applause] "Is it so?" he asked. Yes it is. No.'
    assert udlm.split_sentences(text) == ['We met here today.', '"Is it so?" he asked.']  # < 4 words dropped


def test_packing_appends_a_separator_after_every_sentence():
    rows = udlm.pack_rows([[1, 2], [3], [4, 5, 6, 7]], 9, 3)
    assert rows.tolist() == [[1, 2, 9], [3, 9, 4], [5, 6, 7]]  # the remainder [9] is dropped


def test_subsets_are_nested_and_sized_by_ceil():
    rows = np.arange(1000)[:, None]
    subsets = [set(udlm.subset_rows(rows, f, seed=1).ravel()) for f in (0.001, 0.01, 0.05, 0.07, 1.0)]
    assert [len(s) for s in subsets] == [1, 10, 50, 70, 1000]
    assert all(a < b for a, b in zip(subsets, subsets[1:]))
    assert set(udlm.subset_rows(rows, 0.05, seed=2).ravel()) != subsets[2]  # another seed, another subset
    assert len(udlm.subset_rows(np.arange(100)[:, None], 0.07, 1)) == 7


def test_text_file_rows_are_cached_and_test_rows_do_not_depend_on_frac(corpus, tmp_path, monkeypatch):
    cfg = udlm.make_config(data=corpus, vocab_size=512, length=32, cache_dir=str(tmp_path))
    full, small = udlm.load_rows(cfg), udlm.load_rows(udlm.make_config(**{**cfg.__dict__, "frac": 0.1}))
    assert np.array_equal(full["test"], small["test"]) and len(small["train"]) == math.ceil(0.1 * len(full["train"]))
    assert set(map(tuple, small["train"])) <= set(map(tuple, full["train"]))
    assert len(os.listdir(tmp_path)) == 2
    monkeypatch.setattr(udlm, "pack_rows", None)  # a cache hit must not re-tokenize
    assert np.array_equal(udlm.load_rows(cfg)["train"], full["train"])
    sep = udlm.get_tokenizer(512).eot_token
    assert (full["train"] == sep).sum() > 0 and full["train"].max() < 512


def write_lm1b(root, train_lines, test_lines):
    for sub, name, lines in (("training-monolingual.tokenized.shuffled", "news.en-00001-of-00100", train_lines),
                             ("heldout-monolingual.tokenized.shuffled", "news.en.heldout-00000-of-00050", test_lines)):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        with open(os.path.join(root, sub, name), "w") as fh:
            fh.write("\n".join(lines) + "\n")


def test_lm1b_layout_and_detokenizer(tmp_path):
    write_lm1b(tmp_path, ["He said it 's fine , really .", "Prices rose 5 % ( to $ 10 ) ."] * 20,
               ["They do n't know ."] * 20)
    train, test, _ = udlm.load_sentences(udlm.make_config(data="lm1b", data_dir=str(tmp_path)))
    assert train[:2] == ["He said it's fine, really.", "Prices rose 5% (to $10)."] and test[0] == "They don't know."
    rows = udlm.load_rows(udlm.make_config(data="lm1b", data_dir=str(tmp_path), length=16,
                                           cache_dir=str(tmp_path / "cache")))
    assert rows["train"].shape[1] == 16 and len(rows["test"]) > 0


@pytest.mark.skipif(not os.path.isdir(SHARED_LM1B), reason="../shared/data/lm1b is not present")
def test_lm1b_loader_reads_real_lm1b_files(tmp_path):
    train, test, _ = udlm.load_sentences(udlm.make_config(data="lm1b", data_dir=SHARED_LM1B))
    assert len(train) == 15 and len(test) == 15
    rows = udlm.load_rows(udlm.make_config(data="lm1b", data_dir=SHARED_LM1B, length=32, cache_dir=str(tmp_path)))
    assert len(rows["train"]) > 5 and len(rows["test"]) > 5


def test_unigram_entropy_closed_form():
    assert udlm.unigram_entropy(np.arange(8).reshape(2, 4), 16) == pytest.approx(math.log(8))
    assert udlm.unigram_entropy(np.zeros((3, 3), dtype=np.int64), 16) == 0.0
