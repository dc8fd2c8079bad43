"""eval.py: the paper's memorization -> generalization measurements (Section 4, Appendices B and E) on udlm runs.

    python eval.py recover --ckpt out/cpu-sotu-frac0.05   # Eq. (11) recovery and Eq. (12) entropy, t = 0.05 ... 1
    python eval.py entropy --ckpt out/cpu-sotu-frac0.05   # Fig. 2: entropy along the reverse process; train vs generated
    python eval.py nelbo   --ckpt out/cpu-sotu-frac0.05   # test NELBO (nats/token) and the perplexity bound
    python eval.py score   --ckpt out/cpu-sotu-frac0.05   # Fig. 11: generated samples under a reference scorer
    python eval.py sweep   --presets cpu --out_dir results/cpu   # train and evaluate one model per fraction
    python eval.py hopfield --out_dir results/hopfield           # Section 3: a pseudo-likelihood Hopfield network

Every command appends JSON lines (one per measurement) to a results file; per-token arrays go to .npz files.
The method lives in udlm.py; this file only arranges experiments around it.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import sys

import numpy as np
import torch

import udlm

TS = (0.05, 0.1, 0.25, 0.5, 1.0)  # perturbation times of Fig. 1
HIST_BINS = 40  # entropy histograms stored in results.jsonl: HIST_BINS bins on [0, ln K]


def point(cfg, data):
    """Fields that identify a model in every record."""
    return dict(preset=cfg.preset, frac=cfg.frac, n_train_rows=len(data["train"]), K=cfg.vocab_size)


def histogram(values, K):
    edges = np.linspace(0, math.log(K), HIST_BINS + 1)
    return np.histogram(np.clip(values, 0, math.log(K)), bins=edges)[0].tolist(), edges.tolist()


def mark(enc, ids, marked, left="[", right="]"):
    """Decode token by token, wrapping the marked positions: 'the [nation] is'."""
    pieces = [enc.decode([int(i)]) for i in ids]
    return "".join(f"{left}{p}{right}" if m else p for p, m in zip(pieces, marked)).replace(udlm.SEPARATOR, " | ")


# ---- Eq. (11) and Eq. (12): corrupt-token recovery and the entropy of recovered vs unrecovered tokens ----

def measure_recovery(model, cfg, data, enc, ts=TS, rows=128, steps=128, seed=0):
    """For training rows (the model's own subset) and test rows: perturb at each t, reverse to 1e-5, and measure.
    The entropy of a token is H(x | z_t) of x_theta at the perturbation time t, before any reverse step.
    -> (records, per-token arrays, markdown examples)."""
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    records, arrays, examples = [], {}, []
    for split in ("train", "test"):
        x_rows = data[split][:rows]
        for t in ts:
            r = udlm.recovery_experiment(model, x_rows, t, steps, g)
            x, z, x_hat, H = r["x"], r["z_t"], r["x_hat"], r["entropy"]
            m = udlm.recovery_rate(torch.from_numpy(x), torch.from_numpy(z), torch.from_numpy(x_hat))
            perturbed = z != x
            recovered, unrecovered = perturbed & (x_hat == x), perturbed & (x_hat != x)
            records.append(dict(point(cfg, data), kind="recovery", split=split, t=t, rows=len(x_rows), steps=steps,
                                **m, n_perturbed=int(perturbed.sum()),
                                entropy_recovered=float(H[recovered].mean()) if recovered.any() else None,
                                entropy_unrecovered=float(H[unrecovered].mean()) if unrecovered.any() else None))
            hr, edges = histogram(H[recovered], cfg.vocab_size)
            hu, _ = histogram(H[unrecovered], cfg.vocab_size)
            records.append(dict(point(cfg, data), kind="entropy_hist", split=split, t=t, edges=edges,
                                recovered=hr, unrecovered=hu))
            for k, v in (("x", x), ("z_t", z), ("x_hat", x_hat)):
                arrays[f"{split}_t{t:g}_{k}"] = v.astype(np.uint16)
            arrays[f"{split}_t{t:g}_entropy"] = H.astype(np.float32)
            if t == 0.25:  # App. E.2: [perturbed positions] in the original and perturbed rows, {wrong tokens}
                for i in range(min(2, len(x))):
                    examples.append(f"### {split} row {i}, t = {t}\n\n- original: {mark(enc, x[i], perturbed[i])}\n"
                                    f"- perturbed: {mark(enc, z[i], perturbed[i])}\n"
                                    f"- restored: {mark(enc, x_hat[i], x_hat[i] != x[i], '{', '}')}\n")
    return records, arrays, "\n".join(examples)


# ---- Fig. 2: entropy along the reverse process, and the train vs generated entropy gap at t = 1e-5 ----

def measure_entropy(model, cfg, data, rows=128, steps=128, seed=0):
    """Mean Eq. (12) entropy at each step of the reverse process from t = 1 (perturbed training rows) to 1e-5;
    per-token entropy at t = 1e-5 on training rows and on as many generated samples (greedy final step).
    -> (records, per-token arrays, generated samples (N, L))."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    x = torch.as_tensor(data["train"][:rows], device=device)
    sums = {}  # t -> (sum of per-token entropies, count)

    def record(t, logits):
        H, (total, count) = udlm.conditional_entropy(logits), sums.get(t, (0.0, 0))
        sums[t] = (total + float(H.sum()), count + H.numel())

    for i in range(0, len(x), udlm.EVAL_BATCH):
        xb = x[i:i + udlm.EVAL_BATCH]
        udlm.sample(model, udlm.perturb(xb, 1.0, cfg.vocab_size, g), 1.0, steps, generator=g, on_step=record)
    ts = sorted(sums, reverse=True)
    H_trace = np.array([sums[t][0] / sums[t][1] for t in ts])
    samples = []
    for i in range(0, len(x), udlm.EVAL_BATCH):
        n = min(udlm.EVAL_BATCH, len(x) - i)
        z1 = udlm.uniform_prior(n, cfg.length, cfg.vocab_size, g, device)
        samples.append(udlm.sample(model, z1, 1.0, steps, final="greedy", generator=g).cpu())
    samples = torch.cat(samples).numpy()
    H_train = udlm.token_entropy(model, data["train"][:rows], udlm.T_END, g)
    H_gen = udlm.token_entropy(model, samples, udlm.T_END, g)
    ht, edges = histogram(H_train, cfg.vocab_size)
    hg, _ = histogram(H_gen, cfg.vocab_size)
    records = [dict(point(cfg, data), kind="entropy_trace", rows=len(x), steps=steps, t=ts, entropy=H_trace.tolist()),
               dict(point(cfg, data), kind="entropy_gap", rows=len(x), steps=steps, t=udlm.T_END,
                    entropy_train=float(H_train.mean()), entropy_generated=float(H_gen.mean()),
                    gap=float(H_gen.mean() - H_train.mean())),
               dict(point(cfg, data), kind="entropy_gap_hist", edges=edges, train=ht, generated=hg)]
    arrays = dict(trace_t=np.array(ts), trace_entropy=H_trace, entropy_train=H_train, entropy_generated=H_gen,
                  samples=samples.astype(np.uint16))
    return records, arrays, samples


# ---- test NELBO ----

def measure_nelbo(model, cfg, data, rows=None, seed=0):
    test = data["test"][:rows]
    v = udlm.estimate_nelbo(model, test, seed)
    return [dict(point(cfg, data), kind="nelbo", split="test", rows=len(test), val_nelbo=v, val_ppl=math.exp(min(v, 700)))]


# ---- Fig. 11: sample quality under a reference model ----

class TrigramScorer:
    """Reference scorer built offline from the *full* training split (every fraction is scored by the same model):
    a trigram model over token ids with interpolated absolute discounting (d = 0.75), backing off to bigrams and an
    add-one unigram. It is weaker than GPT-2 Large but honest: it never saw the test rows or the samples."""

    name = "trigram (absolute discounting, full training split)"

    def __init__(self, rows, K, d=0.75):
        self.K, self.d = K, d
        tok = rows.astype(np.int64).ravel()
        self.p1 = (np.bincount(tok, minlength=K) + 1.0) / (len(tok) + K)
        self.tables = [self._table(tok[:-1] * K + tok[1:]), self._table((tok[:-2] * K + tok[1:-1]) * K + tok[2:])]

    def _table(self, keys):
        """Sorted n-gram keys with counts, and per-context totals and numbers of distinct continuations."""
        keys, counts = np.unique(keys, return_counts=True)
        ctx, first = np.unique(keys // self.K, return_index=True)
        totals, distinct = np.add.reduceat(counts, first), np.diff(np.append(first, len(keys)))
        return keys, counts, ctx, totals, distinct

    def _lookup(self, table_keys, values, query):
        i = np.clip(np.searchsorted(table_keys, query), 0, len(table_keys) - 1)
        return np.where(table_keys[i] == query, values[i], 0)

    def _prob(self, table, ctx, nxt, lower):
        keys, counts, ctxs, totals, distinct = table
        c = self._lookup(keys, counts, ctx * self.K + nxt).astype(float)
        total = self._lookup(ctxs, totals, ctx).astype(float)
        types = self._lookup(ctxs, distinct, ctx).astype(float)
        seen = total > 0
        safe = np.where(seen, total, 1.0)
        return np.where(seen, np.maximum(c - self.d, 0) / safe + self.d * types / safe * lower, lower)

    def nll(self, rows):
        """-log p(token | two previous tokens) for positions 2..L-1 of each row, (N, L-2)."""
        r = rows.astype(np.int64)
        a, b, c = r[:, :-2], r[:, 1:-1], r[:, 2:]
        p2 = self._prob(self.tables[0], b, c, self.p1[c])
        return -np.log(self._prob(self.tables[1], a * self.K + b, c, p2))

    def perplexity(self, rows):
        return float(np.exp(self.nll(rows).mean()))


def gpt2_scorer(name="gpt2-large"):
    """GPT-2 through transformers when it is installed with the weights already on disk; else None. Returns
    texts -> perplexity (token-weighted over all texts)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(name, local_files_only=True).eval()
    except Exception:
        return None

    @torch.no_grad()
    def perplexity(texts):
        nll, n = 0.0, 0
        for text in texts:
            ids = tok(text, return_tensors="pt").input_ids[:, :1024]
            if ids.shape[1] > 1:
                nll += float(lm(ids, labels=ids).loss) * (ids.shape[1] - 1)
                n += ids.shape[1] - 1
        return math.exp(nll / max(n, 1))

    perplexity.name = name
    return perplexity


def reference_scorer(cfg, enc):
    """GPT-2 Large when it is available offline, else the trigram model. -> (name, rows (N, L) -> perplexity).
    Built once per corpus: the sweep reuses it for every point."""
    gpt2 = gpt2_scorer()
    if gpt2 is not None:
        return gpt2.name, lambda rows: gpt2([udlm.decode(enc, r) for r in rows])
    trigram = TrigramScorer(full_training_rows(cfg), cfg.vocab_size)
    return trigram.name, trigram.perplexity


def measure_score(cfg, data, enc, samples, scorer=None):
    """Perplexity of generated samples under the reference scorer, next to the same scorer on real test rows."""
    name, perplexity = scorer or reference_scorer(cfg, enc)
    return [dict(point(cfg, data), kind="sample_score", scorer=name, samples=len(samples),
                 ppl=perplexity(samples), ppl_test_rows=perplexity(data["test"][:len(samples)]))]


def full_training_rows(cfg):
    return udlm.load_rows(dataclasses.replace(cfg, frac=1.0))["train"]


# ---- output ----

def append_records(path, records):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))


def nan_if_none(v):
    return float("nan") if v is None else v  # a mean over no tokens; 0.0 is a real entropy and stays 0.0


def show(records):
    for r in records:
        if r["kind"] == "recovery":
            print(f"{r['split']:5s} t={r['t']:<4g} recovery {r['recovery']:.3f}  unstable {r['unstable']:.3f}  "
                  f"exact {r['exact']:.3f}  H(recovered) {nan_if_none(r['entropy_recovered']):.3f}  "
                  f"H(unrecovered) {nan_if_none(r['entropy_unrecovered']):.3f}")
        elif r["kind"] == "entropy_gap":
            print(f"entropy at t=1e-5: train {r['entropy_train']:.3f}  generated {r['entropy_generated']:.3f}  "
                  f"gap {r['gap']:.3f} nats")
        elif r["kind"] == "nelbo":
            print(f"test NELBO {r['val_nelbo']:.4f} nats/token (perplexity bound {r['val_ppl']:.1f}) on {r['rows']} rows")
        elif r["kind"] == "sample_score":
            print(f"sample perplexity {r['ppl']:.1f} under {r['scorer']} (real test rows: {r['ppl_test_rows']:.1f})")


def evaluate_point(model, cfg, data, enc, rows, steps, seed=0, scorer=None, out_dir=None):
    """All measurements of one model -> records; per-token arrays and examples are saved in out_dir if given."""
    nelbo = measure_nelbo(model, cfg, data, seed=seed)
    rec, arr_r, examples = measure_recovery(model, cfg, data, enc, TS, rows, steps, seed)
    ent, arr_e, samples = measure_entropy(model, cfg, data, rows, steps, seed)
    records = nelbo + rec + ent + measure_score(cfg, data, enc, samples, scorer)
    for r in records:  # every record of a point carries the model's test NELBO
        r.setdefault("val_nelbo", nelbo[0]["val_nelbo"])
    if out_dir:
        np.savez_compressed(os.path.join(out_dir, "recover.npz"), **arr_r)
        np.savez_compressed(os.path.join(out_dir, "entropy.npz"), **arr_e)
        with open(os.path.join(out_dir, "examples.md"), "w") as fh:
            fh.write(examples)
    return records


# ---- sweep: one model per (preset, fraction), nested subsets, one seed; resumable ----

def default_fracs(n_rows, n_points=7, smallest_rows=32):
    """Log-spaced fractions from ~smallest_rows rows to all rows (2 significant digits)."""
    return [float(f"{f:.2g}") for f in np.geomspace(smallest_rows / n_rows, 1.0, n_points)]


def finished_points(path):
    """Points with a 'done' record; records of unfinished points are dropped from the file (they restart)."""
    if not os.path.exists(path):
        return set()
    with open(path) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    done = {(r["preset"], r["frac"]) for r in records if r["kind"] == "done"}
    keep = [r for r in records if (r["preset"], r["frac"]) in done]
    if len(keep) != len(records):
        with open(path + ".tmp", "w") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(path + ".tmp", path)
    return done


def sweep(presets, fracs, out_dir, rows, steps, seed=1, overrides=None, quiet=False):
    """Train (or resume) and evaluate each (preset, fraction) in turn; -> path of results.jsonl."""
    import time
    from tqdm import tqdm
    overrides = overrides or {}
    results = os.path.join(out_dir, "results.jsonl")
    if fracs is None:
        probe = udlm.make_config(presets[0], seed=seed, **overrides)
        fracs = default_fracs(udlm.load_rows(probe)["n_train_all"])
    done = finished_points(results)
    points = [(p, f) for p in presets for f in fracs]
    bar = tqdm(points, desc="sweep", disable=quiet, dynamic_ncols=True)
    scorers = {}
    for preset, frac in bar:
        if (preset, frac) in done:
            continue
        run_dir = os.path.join(out_dir, "runs", f"{preset}-frac{frac:g}")
        bar.set_postfix_str(f"{preset} frac={frac:g}: training")
        if not os.path.exists(os.path.join(run_dir, "ckpt.pt")):
            shutil.rmtree(run_dir, ignore_errors=True)  # interrupted before its first checkpoint: start over
        cfg = udlm.make_config(preset, frac=frac, seed=seed, out_dir=run_dir, resume=True, **overrides)
        summary = udlm.train(cfg, quiet=True, evaluate=False)
        bar.set_postfix_str(f"{preset} frac={frac:g}: evaluating")
        t0 = time.time()
        model, cfg, enc = udlm.load_model(run_dir, udlm.resolve_device(cfg.device))
        data = udlm.load_rows(cfg)
        key = (cfg.data, cfg.vocab_size, cfg.length)
        if key not in scorers:
            scorers[key] = reference_scorer(cfg, enc)
        records = evaluate_point(model, cfg, data, enc, rows, steps, seed, scorers[key], run_dir)
        records.append(dict(point(cfg, data), kind="done", train_s=summary["train_s"], eval_s=time.time() - t0,
                            steps=summary["steps"], params=sum(p.numel() for p in model.parameters())))
        append_records(results, records)
    return results


# ---- Section 3: a Hopfield network trained by pseudo-likelihood, next to the diffusion model ----

def random_spins(n, L, g):
    return torch.randint(0, 2, (n, L), generator=g).double() * 2 - 1


def flip(x, p, g):
    """Each spin flipped with probability p: -> (corrupted copy, flipped mask)."""
    mask = torch.rand(x.shape, generator=g, dtype=torch.float64) < p
    return torch.where(mask, -x, x), mask


def spin_recovery(W, x, g, p=0.1):
    """Corrupt p of the spins, run Eq. (6) to a fixed point; -> (fraction of flipped spins restored (the Eq. 11
    analogue), fraction of patterns restored exactly, final states)."""
    corrupted, flipped = flip(x, p, g)
    s, converged = udlm.hopfield_retrieve(W, corrupted)
    return (float(((s == x) & flipped).sum() / flipped.sum()), float((s == x).all(-1).double().mean()), s,
            float(converged.double().mean()))


def hopfield_capacity(L, loads, g, pl_steps, bar):
    """Random patterns at load gamma = P/L: fraction stored as fixed points and retrieved from 10% flips."""
    records = []
    for gamma in loads:
        x = random_spins(max(1, round(gamma * L)), L, g)
        for rule, W in (("hebbian", udlm.hebbian_couplings(x)), ("pseudo-likelihood",
                                                                 udlm.train_pseudo_likelihood(x, pl_steps))):
            margins = udlm.hopfield_margin(W, x)
            _, exact, _, _ = spin_recovery(W, x, g)
            records.append(dict(kind="hopfield_capacity", rule=rule, L=L, P=len(x), gamma=gamma,
                                fixed_points=float((margins.min(-1).values > 0).double().mean()),
                                retrieved=exact, min_margin=float(margins.min())))
        bar.update(1)
    return records


def hopfield_generalization(L, sizes, g, pl_steps, bar, n_protos=3, noise=0.1, n_test=200):
    """Patterns = n_protos hidden prototypes with each spin flipped with probability noise; train on P of them and
    restore 10%-corrupted training vs unseen test patterns (the toy analogue of Fig. 1)."""
    protos = random_spins(n_protos, L, g)

    def draw(n):
        return flip(protos[torch.randint(0, n_protos, (n,), generator=g)], noise, g)[0]

    test, records = draw(n_test), []
    for P in sizes:
        train = draw(P)
        W = udlm.train_pseudo_likelihood(train, pl_steps)
        for split, x in (("train", train[:n_test]), ("test", test)):
            recovery, exact, s, converged = spin_recovery(W, x, g)
            overlap = (s @ protos.T / L).abs().max(-1).values  # |overlap| with the nearest prototype
            records.append(dict(kind="hopfield_generalization", split=split, L=L, P=P, prototypes=n_protos,
                                noise=noise, recovery=recovery, exact=exact, converged=converged,
                                prototype_overlap=float(overlap.mean())))
        bar.update(1)
    return records


def hopfield(out_dir, L=100, seed=0, pl_steps=300, quiet=False):
    """Both Section-3 experiments; appends to out_dir/results.jsonl (plot.py draws hopfield.png)."""
    from tqdm import tqdm
    g = torch.Generator().manual_seed(seed)
    loads = [0.05, 0.1, 0.14, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0]
    sizes = [10, 20, 50, 100, 200, 500, 1000, 3000]
    with tqdm(total=len(loads) + len(sizes), desc="hopfield", disable=quiet) as bar:
        records = hopfield_capacity(L, loads, g, pl_steps, bar) + hopfield_generalization(L, sizes, g, pl_steps, bar)
    path = os.path.join(out_dir, "results.jsonl")
    append_records(path, records)
    return path


# ---- command line ----

def parse_overrides(pairs):
    """['max_steps=600', 'lr=2e-3'] -> {'max_steps': 600, 'lr': 0.002} typed by udlm.Config."""
    fields = {f.name: f.type for f in dataclasses.fields(udlm.Config)}
    out = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise udlm.UsageError(f"--set {pair}: {key!r} is not a udlm.Config field")
        out[key] = udlm._parse_bool(value) if fields[key] is bool else fields[key](value)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("recover", "entropy", "nelbo", "score"):
        p = sub.add_parser(name)
        p.add_argument("--ckpt", required=True, help="run directory or ckpt.pt")
        p.add_argument("--rows", type=int, default=None if name == "nelbo" else 128,
                       help="rows per split (default: 128; all test rows for nelbo)")
        p.add_argument("--steps", type=int, default=128, help="reverse-process grid size (default 128)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto")
        p.add_argument("--out", default="", help="results file (default <run dir>/eval.jsonl)")
        if name == "recover":
            p.add_argument("--ts", type=float, nargs="+", default=list(TS), help="perturbation times")
    p = sub.add_parser("hopfield", help="Section 3: capacity and generalization of a pseudo-likelihood Hopfield net")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--L", type=int, default=100, help="neurons (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("sweep")
    p.add_argument("--presets", nargs="+", default=["cpu"])
    p.add_argument("--fracs", type=float, nargs="+", default=None, help="default: log-spaced, ~32 rows to all")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--rows", type=int, default=64, help="rows per split for each measurement (default 64)")
    p.add_argument("--steps", type=int, default=64, help="reverse-process grid size (default 64)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=800, help="training steps of every model (default 800; the "
                   "paper: 1,000,000)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout of every model (default 0: at 800 steps it "
                   "doubles memorization of the smallest subsets; the paper: 0.1 over 1,000,000 steps)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="udlm.Config overrides, e.g. lr=2e-3")
    args = parser.parse_args(argv)
    udlm.tune_allocator()
    try:
        if args.command == "hopfield":
            print(hopfield(args.out_dir, args.L, args.seed))
            return 0
        if args.command == "sweep":
            if any(not 0 < f <= 1 for f in args.fracs or []):
                raise udlm.UsageError("--fracs must lie in (0, 1]")
            print(sweep(args.presets, args.fracs, args.out_dir, args.rows, args.steps, args.seed,
                        dict(max_steps=args.max_steps, dropout=args.dropout, **parse_overrides(args.set))))
            return 0
        device = udlm.resolve_device(args.device)
        model, cfg, enc = udlm.load_model(args.ckpt, device)
        data = udlm.load_rows(cfg)
        run_dir = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt)
        out = args.out or os.path.join(run_dir, "eval.jsonl")
        if args.command == "recover":
            records, arrays, examples = measure_recovery(model, cfg, data, enc, args.ts, args.rows, args.steps, args.seed)
            np.savez_compressed(os.path.join(run_dir, "recover.npz"), **arrays)
            with open(os.path.join(run_dir, "examples.md"), "w") as fh:
                fh.write(examples)
        elif args.command == "entropy":
            records, arrays, _ = measure_entropy(model, cfg, data, args.rows, args.steps, args.seed)
            np.savez_compressed(os.path.join(run_dir, "entropy.npz"), **arrays)
        elif args.command == "nelbo":
            records = measure_nelbo(model, cfg, data, args.rows, args.seed)
        else:
            _, _, samples = measure_entropy(model, cfg, data, args.rows, args.steps, args.seed)
            records = measure_score(cfg, data, enc, samples)
        append_records(out, records)
        show(records)
        print(f"appended {len(records)} records to {out}")
    except udlm.UsageError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
