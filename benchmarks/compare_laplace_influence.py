"""functx's Laplace and influence pipelines side by side with laplace-torch 0.3 and kronfluence 1.0.1.

Named compare_* (not bench_*): benchmarks/run.py and docs/benchmarks.md cover the test venv's
scripts; this one is never imported at runtime or by the tests: it needs its own venv (laplace-torch imports torchvision,
whose index wheel needs the index's CUDA build of torch), made and run by this make recipe::

    bench-apps:  ## Laplace/influence comparisons (own venv: laplace-torch, kronfluence)
    	python3 -m venv .venv-compare
    	.venv-compare/bin/pip install torch==2.14.1 torchvision==0.29.1 laplace-torch==0.3 \
    	    kronfluence==1.0.1 scikit-learn
    	.venv-compare/bin/pip install -e .
    	OMP_NUM_THREADS=1 .venv-compare/bin/python benchmarks/compare_laplace_influence.py

Problem (the issue's): scikit-learn digits, 1000 training digits, MLP 64-64-32-10 tanh (P = 6570),
Adam to MAP, float64, one thread. Each timing is the median of ``--repeats`` runs, in one process.

Laplace: ``Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")``
(type-2 KFAC, separate bias block, summed-CE likelihood) against ``fc.KFACOperator(...,
fisher="type-2")`` of ``CrossEntropyLoss(reduction="sum")``; the log marginal likelihood at the same
prior precision, the probit GLM predictive on 400 test digits, and the times of fit, prior tuning
(marglik, 100 Adam steps on log prior) and predict.

Influence: kronfluence's EK-FAC with ``use_empirical_fisher=True`` (deterministic: true labels) and
a weight+bias block, against ``fc.EKFACOperator(..., fisher="empirical", joint_bias=True)`` of the
mean CE (kronfluence's Fisher of the mean loss), the same damping; Spearman of the self-influence
and 20 x 1000 pairwise scores, and the times of factors, self scores and pairwise scores.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time

import torch
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from torch import nn

import functx.curvature as fc

DT = torch.float64


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def problem():
    digits = load_digits()
    perm = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
    X = torch.tensor(digits.data, dtype=DT)[perm] / 16.0
    y = torch.tensor(digits.target)[perm]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        value = nn.functional.cross_entropy(model(X[:1000]), y[:1000], reduction="sum")
        (value + 0.5 * sum(p.pow(2).sum() for p in model.parameters())).backward()
        opt.step()
    return model.eval(), X[:1000], y[:1000], X[1397:1797], y[1397:1797]


def bench_laplace(model, X, y, X_te, repeats):
    from laplace import Laplace

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=250)
    prior = 1.0
    params = {k: v.detach() for k, v in model.named_parameters()}
    theta = torch.cat([v.reshape(-1) for v in params.values()])
    P = theta.numel()
    rows = []

    # laplace-torch
    def lt_fit():
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", prior_precision=prior)
        la.fit(loader)
        return la

    t_fit, la = timed(lt_fit, repeats)
    lml_lt = la.log_marginal_likelihood(prior_precision=torch.tensor(prior, dtype=DT)).item()
    t_pred, p_lt = timed(lambda: la(X_te, pred_type="glm", link_approx="probit"), repeats)

    def lt_prior():
        la.prior_precision = prior
        la.optimize_prior_precision(method="marglik", n_steps=100)
        return float(la.prior_precision)

    t_prior, prior_lt = timed(lt_prior, repeats)
    rows.append(("laplace-torch 0.3", t_fit, t_prior, t_pred))

    # functx
    loss = nn.CrossEntropyLoss(reduction="sum")
    with torch.no_grad():
        log_lik = -loss(model(X), y)
    batches = list(zip(X.split(250), y.split(250)))
    t_fit, K = timed(lambda: fc.KFACOperator(model, loss, params, batches, fisher="type-2"), repeats)

    def lml(delta):
        return log_lik - 0.5 * (K.logdet(delta) - P * torch.log(delta) + delta * theta @ theta)

    lml_fx = lml(torch.tensor(prior, dtype=DT)).item()

    def fx_prior():
        log_prior = torch.zeros((), dtype=DT, requires_grad=True)
        opt = torch.optim.Adam([log_prior], lr=0.1)
        for _ in range(100):
            opt.zero_grad()
            (-lml(log_prior.exp())).backward()
            opt.step()
        return log_prior.exp().item()

    t_prior, prior_fx = timed(fx_prior, repeats)

    def fx_pred():
        var = fc.output_covariance(model, params, X_te, K.inverse(prior), diagonal=True)
        with torch.no_grad():
            return torch.softmax(model(X_te) / torch.sqrt(1 + math.pi / 8 * var), 1)

    t_pred, p_fx = timed(fx_pred, repeats)
    rows.append(("functx", t_fit, t_prior, t_pred))
    print("\n## Laplace (KFAC-GGN, all weights, digits MLP, P = 6570, 1000 train, 400 predictions)\n")
    print("| | fit | prior (marglik, 100 steps) | predict (probit) | total |")
    print("|---|---|---|---|---|")
    for name, a, b, c in rows:
        print(f"| {name} | {a:.3f} s | {b:.3f} s | {c:.3f} s | {a + b + c:.3f} s |")
    lt_total, fx_total = sum(rows[0][1:]), sum(rows[1][1:])
    print(f"\nfunctx / laplace-torch total time: {fx_total / lt_total:.2f}x; predict: {rows[1][3] / rows[0][3]:.3f}x")
    print(f"log marginal likelihood at prior precision {prior}: laplace-torch {lml_lt:.3f}, functx {lml_fx:.3f}")
    print(f"tuned prior precision: laplace-torch {prior_lt:.4f}, functx {prior_fx:.4f}")
    print(f"predictive probabilities: max |p_lt - p_functx| = {(p_lt - p_fx).abs().max().item():.2e}")


def bench_influence(model, X, y, X_te, y_te, repeats):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class CE(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, t = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    t = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return nn.functional.cross_entropy(logits, t, reduction="sum")

        def compute_measurement(self, batch, model):
            x, t = batch
            return nn.functional.cross_entropy(model(x), t, reduction="sum")

    params = {k: v.detach() for k, v in model.named_parameters()}
    train_ds = torch.utils.data.TensorDataset(X, y)
    query_ds = torch.utils.data.TensorDataset(X_te[:20], y_te[:20])
    batches = list(zip(X.split(250), y.split(250)))
    E0 = fc.EKFACOperator(model, nn.CrossEntropyLoss(), params, batches, fisher="empirical", joint_bias=True)
    # examples/influence.py's default damping: 0.3 x the largest eigenvalue of E
    damping = 0.3 * max(float(b.eigenvalues.max()) for b in E0.blocks.values())
    rows = []

    # kronfluence
    wrapped = prepare_model(copy.deepcopy(model), CE())
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("bench", wrapped, CE(), cpu=True, disable_tqdm=True, output_dir=out)
        factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        score_args = ScoreArguments(damping_factor=damping)

        def kf_factors():
            analyzer.fit_all_factors(
                "f", train_ds, per_device_batch_size=250, factor_args=factor_args, overwrite_output_dir=True
            )

        def kf_self():
            analyzer.compute_self_scores(
                "s", "f", train_ds, per_device_train_batch_size=250, score_args=score_args, overwrite_output_dir=True
            )
            return analyzer.load_self_scores("s")["all_modules"]

        def kf_pairwise():
            analyzer.compute_pairwise_scores(
                "p",
                "f",
                query_ds,
                train_ds,
                per_device_query_batch_size=20,
                per_device_train_batch_size=250,
                score_args=score_args,
                overwrite_output_dir=True,
            )
            return analyzer.load_pairwise_scores("p")["all_modules"]

        t_f, _ = timed(kf_factors, repeats)
        t_s, self_kf = timed(kf_self, repeats)
        t_p, pair_kf = timed(kf_pairwise, repeats)
    rows.append(("kronfluence 1.0.1", t_f, t_s, t_p))

    # functx
    loss = nn.CrossEntropyLoss()
    t_f, E = timed(lambda: fc.EKFACOperator(model, loss, params, batches, fisher="empirical", joint_bias=True), repeats)
    t_s, self_fx = timed(
        lambda: fc.influence(model, loss, params, batches, None, E.inverse(damping), self_influence=True), repeats
    )
    t_p, pair_fx = timed(
        lambda: fc.influence(model, loss, params, batches, [(X_te[:20], y_te[:20])], E.inverse(damping)), repeats
    )
    rows.append(("functx", t_f, t_s, t_p))
    print(f"\n## Influence (EK-FAC, empirical Fisher, digits MLP, damping 0.3 x largest eigenvalue = {damping:.2e})\n")
    print("| | factors | self scores (1000) | pairwise (20 x 1000) | total |")
    print("|---|---|---|---|---|")
    for name, a, b, c in rows:
        print(f"| {name} | {a:.3f} s | {b:.3f} s | {c:.3f} s | {a + b + c:.3f} s |")
    print(f"\nfunctx / kronfluence total time: {sum(rows[1][1:]) / sum(rows[0][1:]):.2f}x")
    pair_kf, self_kf = pair_kf.to(DT), self_kf.to(DT)
    per_query = [spearmanr(a, b)[0] for a, b in zip(pair_fx, pair_kf)]
    print(
        f"self-influence Spearman {spearmanr(self_fx, self_kf)[0]:.4f}; pairwise: median per-query Spearman "
        f"{statistics.median(per_query):.4f} (min {min(per_query):.4f}); "
        f"max relative difference {((pair_fx - pair_kf).abs().max() / pair_kf.abs().max()).item():.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, X, y, X_te, y_te = problem()
    bench_laplace(model, X, y, X_te, args.repeats)
    bench_influence(model, X, y, X_te, y_te, args.repeats)


if __name__ == "__main__":
    main()
