"""Laplace predictive uncertainty on scikit-learn's digits: KFAC-GGN posterior,
marginal-likelihood prior tuning, GLM probit predictive, against MAP and temperature
scaling.

An MLP 64-64-32-10 (tanh, P = 6570) is trained to MAP on 1000 digits. The Laplace
posterior is ``N(theta_MAP, (G + diag(delta))^-1)`` with ``G`` the KFAC approximation of
the GGN of the summed cross-entropy (``fc.KFACOperator(..., fisher="type-2")``, a
separate block per weight and per bias) and ``delta`` the prior precision: one scalar,
or one per layer, chosen by maximising the Laplace log marginal likelihood

    log p(D) ~= -L(theta) - 1/2 (log det(G + delta)
                                 - sum_b p_b log delta_b + sum_b delta_b |theta_b|^2)

with Adam on ``log delta`` through ``K.logdet(damping)`` (exact, differentiable,
eigendecompositions cached: a step costs no data pass). The predictive is the GLM probit
approximation ``softmax(f(x) / sqrt(1 + pi/8 diag(J S J^T)))`` with ``J S J^T`` from
``fc.output_covariance`` and ``S = K.inverse(delta)``. We report accuracy, NLL, ECE and
Brier on 400 held-out digits and the AUROC of the max-probability for telling them from
the same digits rotated by 90 degrees.

Honest trade-off: the MAP network is already well calibrated; all-weights KFAC Laplace
with a tuned scalar prior is underconfident in distribution (higher NLL/ECE) but
separates rotated digits better; the last-layer Laplace sits in between. A tuned
predictive keeps both: a temperature ``T`` on the mean logits and a scale ``s`` on the
posterior covariance, ``softmax(f / (T sqrt(1 + pi/8 s diag(J S J^T))))``, fitted to the
validation NLL, is as well calibrated as temperature-scaled MAP and still flags rotated
digits better than MAP. The script asserts what holds: a higher OOD AUROC than MAP for
the marglik-tuned Laplace (scalar and per-layer prior) and for the tuned predictive, the
tuned predictive's NLL within 0.01 of temperature scaling's, accuracy within 2 points.

The MAP's own OOD score is fragile: on rotated digits (pixels / 16) it is about as
confident as on held-out ones (AUROC near 0.5, varying with the initialisation: printed
for four more seeds), and on per-pixel standardised inputs the answer depends on the
order of rotation and standardisation (rotating standardised features moves each
pixel's mean and scale elsewhere: a different, easier shift for the MAP; rotating the
image and then standardising sends ink to nearly-constant pixels, huge inputs that
Laplace flags and the saturated MAP does not). Both protocols are printed, MAP against
scalar-prior KFAC Laplace, so that numbers measured elsewhere can be matched to theirs.

It also checks KFAC against the exact full-GGN Laplace on a tiny network (log marginal
likelihood and predictive; tests/test_curvature_apps.py checks the exact pipeline
against a dense one).

Run: `python examples/laplace.py [--plot PATH]` (needs scikit-learn)
"""

import argparse
import itertools
import math
import time

import torch
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from torch import nn

import functx.curvature as fc

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument(
    "--plot", metavar="PATH", help="save a reliability diagram (needs matplotlib)"
)
args = parser.parse_args()
torch.manual_seed(0)
DT = torch.float64
start = time.perf_counter()

# -- data: 1000 train / 397 validation / 400 test, and the test digits rotated by 90 deg
digits = load_digits()
X_all = torch.tensor(digits.data, dtype=DT) / 16.0
y_all = torch.tensor(digits.target)
perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
X_all, y_all = X_all[perm], y_all[perm]
# pixels in [0, 1]; no per-pixel standardisation, which the rotation would break
X_tr, y_tr = X_all[:1000], y_all[:1000]
X_va, y_va = X_all[1000:1397], y_all[1000:1397]
X_te, y_te = X_all[1397:1797], y_all[1397:1797]
X_rot = torch.rot90(X_all[1397:1797].reshape(-1, 8, 8), 1, (1, 2)).reshape(-1, 64)
train = list(zip(X_tr.split(250), y_tr.split(250)))


# -- MAP: Adam on the summed cross-entropy plus the prior (weight decay) ---------------
def train_map(X: torch.Tensor, seed: int = 0) -> nn.Module:
    """MLP 64-64-32-10 (tanh): 300 full-batch Adam steps (lr 1e-2) on the summed CE plus
    the Gaussian prior 1/2 |theta|^2 (prior precision 1)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)
    ).to(DT)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        objective = nn.functional.cross_entropy(net(X), y_tr, reduction="sum")
        objective = objective + 0.5 * sum(p.pow(2).sum() for p in net.parameters())
        objective.backward()
        opt.step()
    return net.eval()


model = train_map(X_tr)
params = {k: v.detach() for k, v in model.named_parameters()}


def metrics(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> dict:
    conf, pred = probs.max(1)
    correct = (pred == y).to(DT)
    edges = torch.linspace(0, 1, bins + 1, dtype=DT)
    ece = sum(
        (m.sum() / len(y)) * (correct[m].mean() - conf[m].mean()).abs()
        for lo, hi in itertools.pairwise(edges)
        if (m := (conf > lo) & (conf <= hi)).any()
    )
    onehot = nn.functional.one_hot(y, 10).to(DT)
    return {
        "acc": correct.mean().item(),
        "nll": -probs[torch.arange(len(y)), y].clamp_min(1e-12).log().mean().item(),
        "ece": float(ece),
        "brier": (probs - onehot).pow(2).sum(1).mean().item(),
    }


def auroc(p_in: torch.Tensor, p_out: torch.Tensor) -> float:
    """AUROC of the max-probability (in-distribution, label 1, is more confident)."""
    scores = torch.cat([p_in.max(1).values, p_out.max(1).values]).detach()
    labels = torch.cat([torch.ones(len(p_in)), torch.zeros(len(p_out))])
    return float(roc_auc_score(labels.numpy(), scores.numpy()))


with torch.no_grad():
    logits = {
        name: model(X) for name, X in (("va", X_va), ("te", X_te), ("rot", X_rot))
    }
results, reliability = {}, {}
results["MAP"] = (
    metrics(logits["te"].softmax(1), y_te),
    auroc(logits["te"].softmax(1), logits["rot"].softmax(1)),
)
reliability["MAP"] = logits["te"].softmax(1)

# -- temperature scaling on the validation split ---------------------------------------
log_T = torch.zeros((), dtype=DT, requires_grad=True)
opt_T = torch.optim.LBFGS([log_T], lr=0.5, max_iter=50)


def closure():
    opt_T.zero_grad()
    value = nn.functional.cross_entropy(logits["va"] / log_T.exp(), y_va)
    value.backward()
    return value


opt_T.step(closure)
T = log_T.exp().item()
p_te, p_rot = (logits["te"] / T).softmax(1), (logits["rot"] / T).softmax(1)
results["temperature"] = (metrics(p_te, y_te), auroc(p_te, p_rot))


# -- Laplace ---------------------------------------------------------------------------
def laplace(
    subset: list[str], per_layer: bool, net: nn.Module = model, X_train=X_tr, **inputs
) -> tuple[dict, float, dict, object]:
    """Fit KFAC on `subset` of `net`'s parameters, tune the prior precision(s) by
    marginal likelihood (100 Adam steps on log delta), return diag(J S J^T) on `inputs`
    (default: the validation, test and rotated digits)."""
    inputs = inputs or {"va": X_va, "te": X_te, "rot": X_rot}
    sub = {k: v.detach() for k, v in net.named_parameters() if k in subset}
    batches = list(zip(X_train.split(250), y_tr.split(250)))
    K = fc.KFACOperator(
        net, nn.CrossEntropyLoss(reduction="sum"), sub, batches, fisher="type-2"
    )
    with torch.no_grad():
        log_lik = -nn.functional.cross_entropy(net(X_train), y_tr, reduction="sum")
    layers = sorted({k.split(".")[0] for k in subset}) if per_layer else ["all"]
    log_prior = {
        layer: torch.zeros((), dtype=DT, requires_grad=True) for layer in layers
    }
    layer_of = {k: (k.split(".")[0] if per_layer else "all") for k in subset}

    def log_marglik() -> torch.Tensor:
        delta = {k: log_prior[layer_of[k]].exp() for k in K.blocks}
        penalty = sum(
            sum(
                delta[b] * sub[k].pow(2).sum() - sub[k].numel() * delta[b].log()
                for k in K.blocks[b].params
            )
            for b in K.blocks
        )
        return log_lik - 0.5 * (K.logdet(delta) + penalty)

    opt_p = torch.optim.Adam(log_prior.values(), lr=0.1)
    for _ in range(100):
        opt_p.zero_grad()
        (-log_marglik()).backward()
        opt_p.step()
    delta = {k: log_prior[layer_of[k]].detach().exp() for k in K.blocks}
    S = K.inverse(delta)
    var = {
        name: fc.output_covariance(net, sub, X, S, diagonal=True)
        for name, X in inputs.items()
    }
    priors = {layer: round(v.exp().item(), 3) for layer, v in log_prior.items()}
    return var, log_marglik().item(), priors, K


def probit(
    name: str, var: dict, T: float = 1.0, s: float = 1.0, f: dict = logits
) -> torch.Tensor:
    """softmax(f / (T sqrt(1 + pi/8 s diag(J S J^T)))): the GLM probit predictive, with
    a temperature T on the mean and a scale s on the posterior covariance (1, 1:
    plain)."""
    return (f[name] / (T * torch.sqrt(1 + math.pi / 8 * s * var[name]))).softmax(1)


all_params, last = list(params), ["4.weight", "4.bias"]
variances = {}
for label, subset, per_layer in (
    ("KFAC, scalar prior", all_params, False),
    ("KFAC, per-layer prior", all_params, True),
    ("last-layer KFAC", last, False),
):
    var, lml, priors, _ = laplace(subset, per_layer)
    variances[label] = var
    p_te = probit("te", var)
    results[label] = (metrics(p_te, y_te), auroc(p_te, probit("rot", var)))
    reliability[label] = p_te
    print(f"{label}: prior precision {priors}, log marginal likelihood {lml:.1f}")

# -- a tuned predictive: T and s fitted on the validation NLL --------------------------
# All-weights Laplace is underconfident in distribution; fitting a temperature on the
# mean logits and a scale on the covariance to the validation split restores the MAP's
# calibration while keeping part of the posterior's extra uncertainty off-distribution.
var = variances["KFAC, scalar prior"]
log_Ts = torch.zeros(2, dtype=DT, requires_grad=True)
opt_Ts = torch.optim.LBFGS([log_Ts], lr=0.5, max_iter=100)


def closure_Ts():
    opt_Ts.zero_grad()
    T_, s_ = log_Ts.exp()
    value = nn.functional.cross_entropy(
        (logits["va"] / (T_ * torch.sqrt(1 + math.pi / 8 * s_ * var["va"]))), y_va
    )
    value.backward()
    return value


opt_Ts.step(closure_Ts)
T_kfac, s_kfac = log_Ts.exp().tolist()
label = "KFAC, tuned probit"
p_te = probit("te", var, T_kfac, s_kfac)
results[label] = (metrics(p_te, y_te), auroc(p_te, probit("rot", var, T_kfac, s_kfac)))
reliability[label] = p_te

print(
    f"\n{'method':24s} {'acc':>6s} {'NLL':>6s} {'ECE':>6s} {'Brier':>6s}"
    f" {'AUROC rot90':>12s}"
)
for name, (m, a) in results.items():
    print(
        f"{name:24s} {m['acc']:6.3f} {m['nll']:6.3f} {m['ece']:6.3f}"
        f" {m['brier']:6.3f} {a:12.3f}"
    )
print(
    f"temperature T = {T:.2f}; tuned probit (scalar-prior KFAC): T = {T_kfac:.2f},"
    f" covariance scale s = {s_kfac:.2f}"
)

map_acc, map_auroc = results["MAP"][0]["acc"], results["MAP"][1]
for label in ("KFAC, scalar prior", "KFAC, per-layer prior"):
    assert results[label][1] > map_auroc, f"{label}: OOD AUROC not above MAP's"
    assert results[label][0]["acc"] > map_acc - 0.02, f"{label}: accuracy dropped"
tuned, temp = results["KFAC, tuned probit"], results["temperature"]
assert tuned[1] > max(map_auroc, temp[1]), "tuned probit: OOD AUROC not above MAP's"
assert tuned[0]["nll"] < temp[0]["nll"] + 0.01, "tuned probit: NLL above temperature's"

# -- the MAP's OOD baseline ------------------------------------------------------------
# The MAP is about as confident on rotated digits as on held-out ones, whatever the
# initialisation (AUROC near 0.5). Rotating per-pixel *standardised* features instead of
# the image (each pixel keeps another position's mean and scale) is a different, much
# easier shift, on which the MAP alone separates the two sets.
others = [
    auroc(*(train_map(X_tr, seed)(X).softmax(1) for X in (X_te, X_rot)))
    for seed in range(1, 5)
]
sd = X_tr.std(0, correction=0)  # scikit-learn's StandardScaler
mu, sd = X_tr.mean(0), torch.where(sd > 0, sd, 1.0)
std_model = train_map((X_tr - mu) / sd)
Z_te = (X_te - mu) / sd
rotations = {
    "rotate, then standardise": (X_rot - mu) / sd,
    "standardise, then rotate": torch.rot90(Z_te.reshape(-1, 8, 8), 1, (1, 2)).reshape(
        -1, 64
    ),
}
print(
    "\nMAP rotated-digit AUROC, init seeds 1-4: "
    + ", ".join(f"{a:.3f}" for a in others)
)
print(f"standardised pixels: {'MAP':>6s} {'KFAC, scalar prior':>19s}")
var = laplace(all_params, False, std_model, (X_tr - mu) / sd, te=Z_te, **rotations)[0]
with torch.no_grad():
    f_std = {"te": std_model(Z_te)} | {k: std_model(Z) for k, Z in rotations.items()}
for name in rotations:
    a_map = auroc(f_std["te"].softmax(1), f_std[name].softmax(1))
    a_kfac = auroc(probit("te", var, f=f_std), probit(name, var, f=f_std))
    print(f"  {name:36s}: AUROC {a_map:.3f} {a_kfac:19.3f}")

# -- KFAC against the exact full-GGN Laplace on a tiny network -------------------------
torch.manual_seed(1)
tiny = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).to(DT)
opt = torch.optim.Adam(tiny.parameters(), lr=1e-2)
for _ in range(200):
    opt.zero_grad()
    value = nn.functional.cross_entropy(tiny(X_tr[:250]), y_tr[:250], reduction="sum")
    (value + 0.5 * sum(p.pow(2).sum() for p in tiny.parameters())).backward()
    opt.step()
tiny_params = {k: v.detach() for k, v in tiny.named_parameters()}
loss_sum = nn.CrossEntropyLoss(reduction="sum")
G = fc.GGNOperator(tiny, loss_sum, tiny_params, train[:1])
K = fc.KFACOperator(tiny, loss_sum, tiny_params, train[:1], fisher="type-2")
theta = torch.cat([v.reshape(-1) for v in tiny_params.values()])
P, delta = theta.numel(), 1.0
with torch.no_grad():
    tiny_lik = -nn.functional.cross_entropy(
        tiny(X_tr[:250]), y_tr[:250], reduction="sum"
    )
common = tiny_lik - 0.5 * (delta * theta @ theta - P * math.log(delta))
dense = G.to_dense() + delta * torch.eye(P, dtype=DT)
lml_exact = common - 0.5 * torch.logdet(dense)
lml_kfac = common - 0.5 * K.logdet(delta)
with torch.no_grad():
    f_te = tiny(X_te)
pred = {
    name: (
        f_te
        / torch.sqrt(
            1
            + math.pi
            / 8
            * fc.output_covariance(tiny, tiny_params, X_te, S, diagonal=True)
        )
    ).softmax(1)
    for name, S in (("exact", torch.linalg.inv(dense)), ("kfac", K.inverse(delta)))
}
gap = (pred["exact"] - pred["kfac"]).abs().max().item()
print(
    f"\ntiny 64-6-10 network on 250 digits (P = {P}), prior precision {delta}:\n"
    f"log marginal likelihood exact (full GGN) {lml_exact:.2f}, KFAC {lml_kfac:.2f};"
    f" predictive max |p_exact - p_kfac| = {gap:.3f}"
)
assert abs(lml_exact - lml_kfac) < 0.3 * abs(lml_exact), (
    "KFAC's log marginal likelihood far from the exact one"
)
print(f"done in {time.perf_counter() - start:.1f} s")

if args.plot:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure")
    else:
        fig, ax = plt.subplots(figsize=(5, 4))
        edges = torch.linspace(0, 1, 11, dtype=DT)
        for name, probs in reliability.items():
            conf, pred_y = probs.max(1)
            xs, ys = [], []
            for lo, hi in itertools.pairwise(edges):
                m = (conf > lo) & (conf <= hi)
                if m.sum() >= 5:
                    xs.append(conf[m].mean().item())
                    ys.append((pred_y[m] == y_te[m]).to(DT).mean().item())
            ax.plot(xs, ys, "o-", label=name, ms=3)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("confidence (max probability)")
        ax.set_ylabel("accuracy")
        ax.set_title("reliability on held-out digits")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"figure saved to {args.plot}")
