"""A hand-written L2O meta-training loop that gains a flatness term through the facade.

The lines marked ``# flat-l2o`` are all it takes. Against the same loop without
flatness-aware meta-training, the diff is::

    +from flat_l2o_plugin import FlatL2O
    +flat = FlatL2O({"hessian_top_eigenvalue": {"weight": 0.1, "start_fraction": 0.5}})
             meta_loss = meta_loss + loss
    +        meta_loss = meta_loss + flat.penalty(params, loss_fn, step=t, loss=loss, horizon=horizon)

(``loss_fn`` is the closure the loop already has for the current batch, ``t`` the
iterate's index in its trajectory.) Call ``flat.after_unroll(...)`` too if observer
plugins should see each unroll.
Run: ``python examples/host_loop.py``.
"""

from __future__ import annotations

import torch

from flat_l2o_plugin import FlatL2O, create_optimizer, create_task


def main(meta_steps: int = 30, unroll: int = 10, horizon: int = 50) -> list[float]:
    torch.manual_seed(0)
    flat = FlatL2O({"hessian_top_eigenvalue": {"weight": 0.1, "start_fraction": 0.5}})  # flat-l2o
    optimizer, task = create_optimizer("rnnprop"), create_task("mlp_digits")
    meta_optimizer = torch.optim.Adam(optimizer.parameters(), lr=3e-3)
    batches = torch.Generator().manual_seed(0)
    losses = []
    for meta_step in range(meta_steps):
        if meta_step % (horizon // unroll) == 0:  # a fresh optimizee every `horizon` steps
            params = task.init_params(seed=meta_step)
            state, t = optimizer.init_state(params), 0
        params = [p.detach().requires_grad_() for p in params]
        state = {k: v.detach() for k, v in state.items()}
        meta_loss = 0.0
        for _ in range(unroll):
            batch = task.sample_batch(batches)
            loss_fn = lambda p, b=batch: task.loss(p, b)  # noqa: E731
            loss = loss_fn(params)
            grads = [g.detach() for g in torch.autograd.grad(loss, params, retain_graph=True)]
            meta_loss = meta_loss + loss
            meta_loss = meta_loss + flat.penalty(params, loss_fn, step=t, loss=loss, horizon=horizon)  # flat-l2o
            params, state = optimizer.step(params, grads, state)
            t += 1
        meta_optimizer.zero_grad()
        (meta_loss / unroll).backward()
        meta_optimizer.step()
        losses.append(float(meta_loss.detach()) / unroll)
    return losses


if __name__ == "__main__":
    losses = main()
    print(f"meta-loss: first {losses[0]:.3f}, last {losses[-1]:.3f}")
