"""The paper's link between local entropy and the Hessian, shown numerically (writes a docs figure).

Near a minimum, −F(θ;γ) ≈ f(θ) + ½ Σᵢ log(λᵢ + γ) − (d/2) log 2π (Laplace), so the
negative local entropy grows with the Hessian's eigenvalues. Left: a quadratic whose
curvature is scaled by c (the Laplace form is exact there) — the closed form, our
smoothing estimator and the Laplace value. Right: a small MLP trained to a minimum,
its loss surface sharpened by scaling the logits — estimator against the Laplace value
computed from ``eigvalsh`` of the exact Hessian, next to the top eigenvalue.

Run: ``python benchmarks/laplace_link.py [--out docs/img/laplace_link.png]``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from flat_l2o_plugin.regularizers import LocalEntropy


def quadratic_curve(scales: list[float], gamma: float = 16.0, d: int = 4) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    base = q @ torch.diag(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)) @ q.T
    theta = torch.zeros(d, dtype=torch.float64)
    exact, estimate, laplace, top = [], [], [], []
    for c in scales:
        a = c * base
        m = a + gamma * torch.eye(d, dtype=torch.float64)
        exact.append(float(-(0.5 * d * math.log(2 * math.pi) - 0.5 * torch.logdet(m))))
        reg = LocalEntropy(gamma=gamma, samples=4096, seed=0)
        estimate.append(float(reg([theta], lambda p, a=a: 0.5 * p[0] @ a @ p[0]).detach()))
        eig = torch.linalg.eigvalsh(a)
        laplace.append(float(0.5 * torch.log(eig + gamma).sum() - 0.5 * d * math.log(2 * math.pi)))
        top.append(float(eig.max()))
    return {"scale": scales, "closed_form": exact, "smoothing": estimate, "laplace": laplace, "top_eigenvalue": top}


def mlp_curve(sharpness: list[float], gamma: float = 100.0) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    params = [torch.randn(8, 4, generator=g, dtype=torch.float64) * 0.5, torch.zeros(8, dtype=torch.float64),
              torch.randn(2, 8, generator=g, dtype=torch.float64) * 0.5, torch.zeros(2, dtype=torch.float64)]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    out = {"sharpness": sharpness, "smoothing": [], "laplace": [], "top_eigenvalue": [], "loss": []}
    for s in sharpness:
        def loss_fn(ps, s=s):  # noqa: ANN001, ANN202
            h = torch.tanh(x @ ps[0].T + ps[1])
            # Weight decay keeps the minimum isolated (a positive definite Hessian).
            return torch.nn.functional.cross_entropy(s * (h @ ps[2].T + ps[3]), y) + 1e-2 * sum((p * p).sum() for p in ps)

        ps = [p.clone().requires_grad_(True) for p in params]
        opt = torch.optim.LBFGS(ps, max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
        opt.step(lambda: (opt.zero_grad(), (l := loss_fn(ps)).backward(), l)[2])
        flat = torch.cat([p.detach().reshape(-1) for p in ps])
        hess = torch.autograd.functional.hessian(
            lambda v: loss_fn([c.view(sh) for c, sh in zip(v.split(sizes), shapes)]), flat)
        eig = torch.linalg.eigvalsh(hess)
        f = float(loss_fn(ps).detach())
        out["loss"].append(f)
        out["top_eigenvalue"].append(float(eig.max()))
        d = flat.numel()
        out["laplace"].append(f + float(0.5 * torch.log(eig.clamp_min(0) + gamma).sum()) - 0.5 * d * math.log(2 * math.pi))
        out["smoothing"].append(float(LocalEntropy(gamma=gamma, samples=2048, seed=0)(
            [p.detach() for p in ps], loss_fn).detach()))
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/laplace_link.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quad = quadratic_curve([0.25, 0.5, 1, 2, 4, 8, 16, 32, 64])
    mlp = mlp_curve([0.5, 1, 2, 4, 8])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(quad["top_eigenvalue"], quad["closed_form"], "k-", label="−F closed form")
    left.plot(quad["top_eigenvalue"], quad["smoothing"], "o", label="−F smoothing estimator")
    left.plot(quad["top_eigenvalue"], quad["laplace"], "--", label="Laplace: ½Σlog(λ+γ) − (d/2)log 2π")
    left.set(xscale="log", xlabel="top Hessian eigenvalue", ylabel="negative local entropy −F",
             title="quadratic, γ = 16")
    left.legend(fontsize=8)
    # Sharpening also lowers f at the minimum, so plot the curvature part −F − f.
    right.plot(mlp["top_eigenvalue"], [e - f for e, f in zip(mlp["smoothing"], mlp["loss"])], "o-",
               label="−F − f, smoothing estimator")
    right.plot(mlp["top_eigenvalue"], [e - f for e, f in zip(mlp["laplace"], mlp["loss"])], "--",
               label="½Σlog(λ+γ) − (d/2)log 2π from eigvalsh")
    right.set(xscale="log", xlabel="top Hessian eigenvalue at the minimum", ylabel="−F − f(θ)",
              title="tanh MLP at a minimum (sharpened), γ = 100")
    right.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    data = {"quadratic": quad, "mlp": mlp}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    for name, curve in data.items():
        print(name)
        for i, lam in enumerate(curve["top_eigenvalue"]):
            print(f"  λ_max {lam:9.3f}   −F estimate {curve['smoothing'][i]:9.4f}   Laplace {curve['laplace'][i]:9.4f}")
    print(f"wrote {out}")
    return data


if __name__ == "__main__":
    main()
