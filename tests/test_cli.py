"""The training CLI end to end: runs, resume, Ctrl-C, divergence, bad input, DDP.
Run: python -m pytest -q tests/test_cli.py"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import udlm
from conftest import ROOT, TINY, write_corpus


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh) if "loss" in r]


def run_main(args, capsys):
    rc = udlm.main(args)
    return rc, capsys.readouterr().err


def test_few_step_cli_run_writes_log_checkpoint_and_summary(tiny_args, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc, err = run_main([*tiny_args, "--max_steps", "4", "--out_dir", out], capsys)
    assert rc == 0, err
    summary = json.load(open(os.path.join(out, "summary.json")))
    for key in ("val_nelbo", "ln_K", "unigram_entropy", "recovery_train", "recovery_test", "entropy_train",
                "wall_s", "tokens_per_s", "params"):
        assert key in summary and summary[key] is not None
    assert summary["ln_K"] == pytest.approx(math.log(512))
    assert len(summary["samples"]) == 3 and len(losses(out)) == 4
    model, cfg, enc = udlm.load_model(out)
    assert cfg.vocab_size == 512 and enc.n_vocab == 512 and not model.training
    assert sum(p.numel() for p in model.parameters()) == summary["params"]


def test_resume_continues_the_same_loss_trajectory(tiny_args, tmp_path, capsys):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert run_main([*tiny_args, "--max_steps", "6", "--out_dir", straight], capsys)[0] == 0
    assert run_main([*tiny_args, "--max_steps", "3", "--out_dir", split], capsys)[0] == 0
    assert run_main([*tiny_args, "--max_steps", "6", "--out_dir", split, "--resume"], capsys)[0] == 0
    assert losses(split) == losses(straight) and len(losses(split)) == 6
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (straight, split))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tiny_args, tmp_path, capsys,
                                                                                   monkeypatch):
    out, calls = str(tmp_path / "nan"), []
    real = udlm.training_loss

    def loss_that_blows_up(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(udlm, "training_loss", loss_that_blows_up)
    rc, err = run_main([*tiny_args, "--max_steps", "10", "--ckpt_every", "2", "--out_dir", out], capsys)
    assert rc == 1 and "nan at step 5" in err and "step 4" in err
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 4


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_args, tmp_path):
    out = str(tmp_path / "sigint")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "udlm.py"), *tiny_args, "--max_steps", "100000",
                             "--out_dir", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(losses(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    step = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert step >= 3
    rc = subprocess.run([sys.executable, os.path.join(ROOT, "udlm.py"), *tiny_args, "--max_steps", str(step + 2),
                         "--out_dir", out, "--resume"], capture_output=True, text=True, timeout=120).returncode
    assert rc == 0 and len(losses(out)) == step + 2


def snapshot(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))} if os.path.isdir(path) else {}


@pytest.mark.parametrize("extra, message", [
    (["--frac", "0"], "--frac must be in (0, 1]"),
    (["--frac", "1.5"], "--frac must be in (0, 1]"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--data", "/nonexistent/corpus.txt"], "neither 'sotu', 'lm1b' nor an existing text file"),
    (["--data", "lm1b"], "--data lm1b needs --data_dir"),
    (["--data", "lm1b", "--data_dir", "/nonexistent"], "--data lm1b needs --data_dir"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--max_steps", "many"], "invalid int value"),
])
def test_bad_input_is_one_line_and_exit_code_2(tiny_args, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    rc, err = run_main([*tiny_args, "--out_dir", str(out), *extra], capsys)
    assert rc == 2 and message in err and err.count("\n") == 1 and not out.exists()


def test_empty_corpus_is_rejected(tiny_args, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    rc, err = run_main([*tiny_args, "--data", str(empty), "--out_dir", str(tmp_path / "o")], capsys)
    assert rc == 2 and "too small" in err and err.count("\n") == 1


def test_existing_run_is_never_overwritten(tiny_args, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_main([*tiny_args, "--max_steps", "2", "--out_dir", out], capsys)[0] == 0
    before = snapshot(out)
    # the same command again without --resume
    rc, err = run_main([*tiny_args, "--max_steps", "2", "--out_dir", out], capsys)
    assert rc == 2 and "already holds a run" in err and err.count("\n") == 1
    # --resume with another vocabulary or preset
    for extra, field in ((["--vocab_size", "600"], "--vocab_size"), (["--preset", "tiny", *TINY], "--preset")):
        rc, err = run_main([*tiny_args, *extra, "--max_steps", "4", "--out_dir", out, "--resume"], capsys)
        assert rc == 2 and f"trained with {field}" in err and err.count("\n") == 1
    assert snapshot(out) == before


def test_corrupt_checkpoint_on_resume(tiny_args, tmp_path, capsys):
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    before = snapshot(out)
    rc, err = run_main([*tiny_args, "--max_steps", "2", "--out_dir", str(out), "--resume"], capsys)
    assert rc == 2 and "corrupt" in err and err.count("\n") == 1 and snapshot(out) == before


def test_ddp_with_two_gloo_processes_matches_one_process(tmp_path):
    """Two CPU ranks each take half of one global batch; with dropout and the curriculum off (both draw noise per
    rank) their averaged losses and the resulting weights equal a single-process run's."""
    corpus = write_corpus(tmp_path / "toy.txt")
    args = ["--data", corpus, "--cache_dir", str(tmp_path / "cache"), *TINY, "--dropout", "0", "--curriculum_steps",
            "0", "--max_steps", "3"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r1 = subprocess.run([sys.executable, os.path.join(ROOT, "udlm.py"), *args, "--out_dir", one], env=env,
                        capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         "29517", os.path.join(ROOT, "udlm.py"), *args, "--out_dir", two], env=env,
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert json.load(open(os.path.join(two, "summary.json")))["world_size"] == 2
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["model"] for d in (one, two))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_import_has_no_side_effects(tmp_path):
    """Importing udlm prints nothing and writes no file; it costs under 3 s of CPU time, torch's import included
    (CPU time rather than wall time, so a busy machine does not fail the test), and udlm adds under 0.5 s."""
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); t0 = time.process_time(); import torch, numpy; "
            f"t1 = time.process_time(); import udlm; t2 = time.process_time(); print(t2 - t0, t2 - t1)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "" and os.listdir(tmp_path) == []
    total, own = map(float, r.stdout.split())
    assert total < 3.0 and own < 0.5
