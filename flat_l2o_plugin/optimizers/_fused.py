"""Deployed steps: the zoo's optimizers as fused, in-place kernels.

Meta-training needs ``step(params, grads, state)``: functional, differentiable, one batch
over every coordinate. Training an ordinary model needs none of that, and pays for it:
each elementwise operation is a pass over memory, the LSTM gates are strided views, and
every step allocates (and page-faults) tensors as large as the model. A zoo optimizer
therefore also offers ``step_(params, grads, state)``: the same mathematics, under
``no_grad``, updating params and state in place, one parameter tensor at a time, written
as kernels that

- keep each tensor's rows in blocks small enough for the cache (the LSTM gates of a
  block of coordinates never leave it),
- compute feature-major, one vector of coordinates per feature or hidden unit, on
  per-coordinate state stored the same way (:func:`feature_major`), so that no block
  is transposed on its way in or out,
- run compiled by ``torch.compile`` (inductor fuses a block's elementwise work, the
  feature computation and the state updates into a few loops), and fall back to the same
  kernels run eagerly when compilation is disabled (``FLAT_L2O_COMPILE=0``) or fails
  (no C++ compiler, an unsupported platform), with one warning.

Compiled float32 kernels build tanh and ELU on :func:`rational_tanh` (a few ulp from
``torch.tanh``, at a fraction of the cost of inductor's vectorised tanh and expm1 on
CPUs); eager kernels and other dtypes use the ``torch`` functions. Every kernel is tested
against the reference ``step``.

This module holds what the kernels share; each optimizer's kernel lives next to its
reference ``step``.
"""

from __future__ import annotations

import os
import types
import warnings
import weakref
from typing import Any, Callable, Hashable, Iterator, MutableMapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import FlatL2OError

__all__ = [
    "COMPILE_ENV",
    "FusedCompileWarning",
    "Kernel",
    "compile_enabled",
    "elu",
    "feature_major",
    "kernel",
    "inplace_step",
    "lstm_stack",
    "lstm_weights",
    "param_slices",
    "prepared",
    "rational_tanh",
    "row_blocks",
    "tanh",
]

COMPILE_ENV = "FLAT_L2O_COMPILE"
"""Environment variable: ``0`` runs the deployed kernels eagerly, anything else compiles them."""

# Below this many rows a tensor runs the eager kernel: torch.compile specialises sizes 0
# and 1, so a one-coordinate parameter would otherwise cost a second compilation.
_MIN_COMPILED_ROWS = 2

# Coefficients of tanh(x) ≈ x·P(x²)/Q(x²) on [0, 9.1], fitted for the least maximum
# relative error (2.4e-8 in exact arithmetic). Every coefficient is positive, so Horner's
# rule adds only positive terms and float32 rounding stays within a few ulp: the largest
# error over every float32 input is 6.03 ulp (at x = 5.43), against 1 ulp for
# torch.tanh. Beyond 9.1, tanh(x) rounds to ±1 in float32.
_TANH_P = (1.0, 0.13377497693097357, 0.003491288059839541, 2.0534057628357293e-05, 1.324282190763032e-08)
_TANH_Q = (1.0, 0.4671081796315983, 0.0258609050718255, 0.0003278417287220183, 7.732446202332283e-07)
_TANH_CLAMP = 9.1


# Let the C++ compiler fuse multiplies and adds (inductor's default keeps them apart):
# fewer instructions in the kernels' polynomials and sums, each rounded once instead of
# twice. Inductor's other backends ignore it.
_COMPILE_OPTIONS: dict[str, Any] = {"cpp.enable_floating_point_contract_flag": "fast"}


class FusedCompileWarning(UserWarning):
    """A deployed kernel could not be compiled and runs eagerly (same results, slower)."""


def rational_tanh(x: Tensor, bounded: bool = True) -> Tensor:
    """tanh as a rational function: a few float32 ulp from ``torch.tanh``, cheaper to fuse.

    Meant for float32 inside compiled kernels, where it becomes about fourteen vector
    instructions and one division; the error bound is for float32 (see the module's
    constants). NaN propagates; ±inf gives ±1. With ``bounded=False`` the result may
    exceed 1 in magnitude by an ulp near saturation, which saves two instructions where
    that cannot matter (inside a recurrent cell).
    """
    x = x.clamp(-_TANH_CLAMP, _TANH_CLAMP)
    t = x * x
    p = _TANH_P[4]
    q = _TANH_Q[4]
    for k in (3, 2, 1, 0):
        p = p * t + _TANH_P[k]
        q = q * t + _TANH_Q[k]
    y = x * p / q
    return y.clamp(-1.0, 1.0) if bounded else y


def tanh(x: Tensor, compiled: bool, bounded: bool = True) -> Tensor:
    """The tanh a kernel uses: :func:`rational_tanh` in compiled float32 code, else ``torch.tanh``.

    Inductor's own vectorised tanh costs about three times as much on the CPUs we
    measured; its sigmoid (an exp and a division) is cheap, so kernels keep ``torch.sigmoid``.
    """
    return rational_tanh(x, bounded) if compiled and x.dtype == torch.float32 else torch.tanh(x)


def elu(x: Tensor, compiled: bool) -> Tensor:
    """ELU (α = 1) as a kernel computes it.

    Compiled float32 code writes ``expm1(x)`` for x ≤ 0 as ``2t / (1 - t)`` with
    ``t = tanh(x/2)`` from :func:`rational_tanh`: no cancellation (``1 - t`` lies in
    [1, 2]), so it stays within about ten ulp, at half the cost of inductor's expm1.
    """
    if compiled and x.dtype == torch.float32:
        t = rational_tanh(0.5 * x, bounded=False)
        return torch.where(x > 0, x, 2.0 * t / (1.0 - t))
    return torch.nn.functional.elu(x)


def compile_enabled() -> bool:
    """Whether deployed kernels are compiled: ``FLAT_L2O_COMPILE`` is not ``0`` and dynamo runs here."""
    if os.environ.get(COMPILE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return bool(torch._dynamo.is_dynamo_supported())


class Kernel:
    """A kernel function run compiled when possible and eagerly otherwise.

    The function is called as ``fn(*row_args, *other_args, config=..., compiled=...)``:
    ``row_args`` are tensors (or ``None``) with one row per coordinate, which the kernel
    reads and writes in place, ``other_args`` the rest (weights, 0-d tensors), ``config``
    its static configuration (hashable; dynamo specialises on it) and ``compiled``
    whether it runs compiled (so it can pick :func:`tanh`). Rows are fed in blocks of
    ``compiled_block`` or ``eager_block`` rows (``None``: all at once), so that a
    kernel's intermediates stay in cache.

    Each :class:`Kernel` compiles its own copy of the function's code, so kernels for
    different configurations never share dynamo's per-function cache and never push
    each other out of it. A compilation failure (raised at the first call, before any
    input is written) is reported once as a :class:`FusedCompileWarning`, and the kernel
    runs eagerly from then on.
    """

    def __init__(self, fn: Callable[..., Any], config: Hashable, compiled_block: int | None,
                 eager_block: int | None) -> None:
        self.fn = fn
        self.config = config
        self.compiled_block = compiled_block
        self.eager_block = eager_block
        self._compiled: Callable[..., Any] | None = None
        self.failed: BaseException | None = None

    def __call__(self, row_args: Sequence[Tensor | None], other_args: Sequence[Any] = ()) -> None:
        rows = next(a for a in row_args if a is not None).shape[0]
        if rows == 0:
            return
        if rows >= _MIN_COMPILED_ROWS and self.failed is None and compile_enabled():
            blocks = list(row_blocks(rows, self.compiled_block or rows))
            if self._first_compiled(_rows(row_args, blocks[0]), other_args):
                for block in blocks[1:]:
                    self._compiled(*_rows(row_args, block), *other_args, config=self.config, compiled=True)
                return
        for block in row_blocks(rows, self.eager_block or rows):
            self.fn(*_rows(row_args, block), *other_args, config=self.config, compiled=False)

    def _first_compiled(self, args: list[Tensor | None], other_args: Sequence[Any]) -> bool:
        if self._compiled is None:
            self._compiled = torch.compile(_fresh_copy(self.fn), options=dict(_COMPILE_OPTIONS))
        # Only the number of rows varies between calls: the weights' shapes stay static,
        # so that loops over hidden units unroll without guards on them.
        for arg in args:
            if arg is not None:
                torch._dynamo.mark_dynamic(arg, 0)
        try:
            self._compiled(*args, *other_args, config=self.config, compiled=True)
            return True
        except Exception as exc:  # no compiler, unsupported platform, inductor bug
            self.failed = exc
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            warnings.warn(
                f"flat_l2o_plugin: the fused {self.fn.__name__} could not be compiled "
                f"({type(exc).__name__}: {message}); it runs eagerly, with the same results but "
                f"slower (set {COMPILE_ENV}=0 to skip compiling)",
                FusedCompileWarning,
                stacklevel=4,
            )
            return False


def _rows(row_args: Sequence[Tensor | None], block: slice) -> list[Tensor | None]:
    return [None if a is None else a[block] for a in row_args]


_KERNELS: dict[tuple[Any, ...], Kernel] = {}


def kernel(fn: Callable[..., Any], config: Hashable, *, compiled_block: int | None = None,
           eager_block: int | None = None) -> Kernel:
    """The :class:`Kernel` of ``fn`` for a static ``config`` (built once per process)."""
    key = (fn, config, compiled_block, eager_block)
    found = _KERNELS.get(key)
    if found is None:
        found = _KERNELS[key] = Kernel(fn, config, compiled_block, eager_block)
    return found


def _fresh_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    # dynamo keys its cache on the code object; a copy gets a cache of its own.
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


_PREPARED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[tuple[Any, ...], Any]]] = (
    weakref.WeakKeyDictionary()
)


def prepared(module: nn.Module, key: Hashable, build: Callable[[], Any]) -> Any:
    """``build()``, cached for ``module`` until one of its weights changes.

    A kernel wants its weights rearranged (gate matrices concatenated, biases summed);
    that costs a few small allocations, which add up over the tensors of a model, so the
    result is kept until a weight is written in place, replaced or moved.
    """
    version = tuple((id(w), w._version, w.data_ptr(), w.dtype, w.device) for w in module.parameters())
    cache = _PREPARED.setdefault(module, {})
    hit = cache.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    with torch.no_grad():
        value = build()
    cache[key] = (version, value)
    return value


def row_blocks(rows: int, block: int) -> Iterator[slice]:
    """Slices of ``range(rows)`` of ``block`` rows each; the last one takes what is left.

    A remainder too short to compile for (one row) joins the block before it.
    """
    starts = list(range(0, rows, block))
    if len(starts) > 1 and rows - starts[-1] < _MIN_COMPILED_ROWS:
        starts.pop()
    for start, stop in zip(starts, starts[1:] + [rows]):
        yield slice(start, stop)


def param_slices(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: MutableMapping[str, Tensor],
    per_coordinate: Sequence[str],
    owner: str,
) -> Iterator[tuple[Tensor, Tensor, dict[str, Tensor], Callable[[], None]]]:
    """Walk the parameters of a flat state: each tensor's coordinates and state rows.

    Yields ``(theta, grad, rows, commit)``: ``theta`` is the parameter as a vector (a
    view when it is contiguous, else a copy), ``grad`` its gradient as a vector,
    ``rows`` the slices of the ``per_coordinate`` state entries that belong to it
    (views, so writing them writes the state), and ``commit()`` writes ``theta`` back
    into the parameter when it had to be copied.

    A per-coordinate matrix (``(N, width)``, an LSTM's states, say) found stored row by
    row is replaced in ``state``, once, by a copy stored feature by feature (see
    :func:`feature_major`); from then on the kernels write it in place.

    Raises:
        FlatL2OError: A per-coordinate state entry does not have one row per coordinate.
    """
    total = sum(p.numel() for p in params)
    for key in per_coordinate:
        value = state.get(key)
        if value is None or value.dim() == 0 or value.shape[0] != total:
            shape = None if value is None else tuple(value.shape)
            raise FlatL2OError(
                f"{owner}.step_(): state[{key!r}] is {shape} but the params have {total} coordinates; "
                f"build the state with {owner}.init_state(params)"
            )
        state[key] = feature_major(value)
    offset = 0
    for p, g in zip(params, grads):
        n = p.numel()
        theta = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
        rows = {key: state[key][offset:offset + n] for key in per_coordinate}
        offset += n

        def commit(p: Tensor = p, theta: Tensor = theta) -> None:
            if theta.data_ptr() != p.data_ptr() or not p.is_contiguous():
                p.copy_(theta.view(p.shape))

        yield theta, g.reshape(-1), rows, commit


def feature_major(value: Tensor) -> Tensor:
    """``value`` with the same shape and entries, its columns contiguous (no copy if they are).

    The kernels compute feature-major: one vector of coordinates per feature or hidden
    unit. A row-major ``(N, width)`` state makes every block transpose on the way in and
    out, which cost a quarter to a third of a recurrent optimizer's deployed step; with
    the columns contiguous a block's rows are contiguous runs. Values are unchanged, so
    the reference ``step`` (any layout) and checkpoints are unaffected, except that
    safetensors wants ``.contiguous()`` copies, as for any transposed tensor.
    """
    if value.dim() != 2 or value.t().is_contiguous():
        return value
    return value.t().contiguous().t()


def inplace_step(module: Any) -> Callable[..., None] | None:
    """The module's in-place deployed step, or ``None`` if it has none it can trust.

    A class's ``step_`` mirrors the ``step`` defined next to it. A subclass that
    overrides ``step`` (or a wrapper, whose ``step`` calls the wrapped optimizer with
    other inputs) would silently lose its changes through an inherited ``step_``, so
    ``step_`` counts only when the class that defines ``step`` also defines it.
    """
    for cls in type(module).__mro__:
        if "step" in vars(cls):
            return getattr(module, "step_") if "step_" in vars(cls) else None
    return None


def lstm_weights(cells: Sequence[nn.LSTMCell]) -> list[Tensor]:
    """Each cell's weights as one gate matrix ``[W_ih, W_hh]`` and one bias ``b_ih + b_hh``.

    With them, a layer's four gates for a block of coordinates are one matrix product
    of the gate matrix with the stacked input and hidden state.
    """
    weights: list[Tensor] = []
    for cell in cells:
        weights.append(torch.cat([cell.weight_ih, cell.weight_hh], dim=1).contiguous())
        weights.append((cell.bias_ih + cell.bias_hh).contiguous())
    return weights


def lstm_stack(x: Tensor, states: Sequence[Tensor], weights: Sequence[Tensor], compiled: bool) -> Tensor:
    """Run stacked LSTM cells on a block of coordinates, writing their states in place.

    Feature-major: ``x`` is ``(input_size, R)`` for R coordinates, so that every gate is
    a contiguous ``(hidden, R)`` block of one matrix product and the elementwise work
    runs along the coordinates. The states keep the optimizers' ``(R, hidden)`` layout.

    Args:
        x: ``(input_size, R)`` inputs of the first layer, in the weights' dtype.
        states: ``h_0, c_0, h_1, c_1, ...``, each ``(R, hidden)``; overwritten with the
            new states (cast to their dtype).
        weights: From :func:`lstm_weights`.
        compiled: Whether the caller runs compiled (picks :func:`tanh`).

    Returns:
        The last layer's new hidden state, ``(hidden, R)``, in the weights' dtype.
    """
    for layer in range(len(weights) // 2):
        gate_matrix, bias = weights[2 * layer], weights[2 * layer + 1]
        h, c = states[2 * layer], states[2 * layer + 1]
        stacked = torch.cat([x, h.t().to(gate_matrix.dtype)], dim=0)
        gates = torch.addmm(bias[:, None], gate_matrix, stacked)
        i, f, g, o = gates.chunk(4, dim=0)
        c_new = torch.sigmoid(f) * c.t().to(gate_matrix.dtype) + torch.sigmoid(i) * tanh(g, compiled, False)
        h_new = torch.sigmoid(o) * tanh(c_new, compiled, False)
        h.copy_(h_new.t())
        c.copy_(c_new.t())
        x = h_new
    return x
