"""Adafactor (Shazeer & Stern 2018) with T5's settings, factoring chosen by logical axis names.

Adafactor keeps, for a weight matrix `[rows, columns]`, only the row and column means of the squared gradient
and reconstructs the second moment as their (normalised) outer product: O(rows + columns) memory instead of
O(rows · columns). Which dimensions are "rows" and "columns" matters. A shape rule (factor the two largest
dims, as optax does) goes wrong for t5k's parameters: a scanned kernel `[layers, embed, mlp]` has a stacking
axis that must never be averaged over (each layer is its own matrix), and an attention kernel
`[embed, heads, kv]` is the matrix `embed × (heads·kv)`, not `heads × kv`.

So every dimension gets a role from its logical name, through these rules (first match wins, like
`partitioning`'s mesh rules):

    logical name           role     meaning
    layers                 BATCH    a stack of independent matrices: statistics, update clipping and the
                                    parameter scale are all computed per index (scanned == unrolled)
    embed                  ROW      the model-width side of every projection and embedding
    mlp, heads, kv,        COLUMN   the other side: MLP hidden, attention heads × head_dim (flattened
    joined_kv, vocab,               together), the vocabulary, the absolute positions
    abspos_buckets
    relpos_buckets         NONE     small tables: never factored
    (any other name)       NONE

A parameter is factored when it has at least one ROW and one COLUMN dimension, no NONE dimension, and both the
product of its ROW sizes and the product of its COLUMN sizes are ≥ `min_dim_size_to_factor`. Otherwise it keeps
its full second moment. A parameter without names (plain arrays, e.g. in unit tests) is treated as `(ROW,
COLUMN)` when it is 2-D and as unfactored otherwise.

Factored statistics are stored with the reduced dimensions kept as size 1 (`v_row`: `[..., rows, 1, ...]`,
the column dims reduced; `v_col` the other way round), so every state leaf has its parameter's rank and takes
its parameter's sharding with the size-1 dims replicated (see `trainer.state_shardings`).

The update, per parameter `w` with gradient `g` at step t = 1, 2, … (T5 settings in brackets):

    β₂ = 1 - t^(-decay_rate)                                   [decay_rate 0.8; β₂ = 0 at t = 1]
    g² + ε₁ → v_row, v_col (factored) or v (not), as exponential moving averages with β₂   [ε₁ 1e-30]
    u = g / sqrt(v_row · v_col / mean_rows(v_row))  or  g / sqrt(v)
    u = u / max(1, rms(u) / clipping_threshold)                [update clipping 1.0]
    u = β₁ m + (1 - β₁) u  when momentum β₁ is set             [none]
    w ← w - lr · max(rms(w), ε₂) · u                            [multiply_by_parameter_scale, ε₂ 1e-3]

where means and rms run over the non-BATCH dims. Statistics may be stored in bfloat16 (`state_dtype`) to halve
optimizer memory; all arithmetic is float32.
"""

import enum
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import optax


class FactorRole(enum.Enum):
    BATCH = "batch"
    ROW = "row"
    COLUMN = "column"
    NONE = "none"


FACTOR_RULES: Tuple[Tuple[str, FactorRole], ...] = (
    ("layers", FactorRole.BATCH),
    ("embed", FactorRole.ROW),
    ("mlp", FactorRole.COLUMN),
    ("heads", FactorRole.COLUMN),
    ("kv", FactorRole.COLUMN),
    ("joined_kv", FactorRole.COLUMN),
    ("vocab", FactorRole.COLUMN),
    ("abspos_buckets", FactorRole.COLUMN),
    ("relpos_buckets", FactorRole.NONE),
)

# Per parameter: a tuple of logical names, one per dimension (a flax `PartitionSpec` is accepted too).
ParamAxes = Any


class Factoring(NamedTuple):
    """How one parameter's second moment is kept; dims are indices into the parameter's shape."""

    batch: Tuple[int, ...]
    rows: Tuple[int, ...]  # reduced in v_col; unfactored: every non-BATCH dim
    columns: Tuple[int, ...]  # reduced in v_row; unfactored: ()
    factored: bool

    @property
    def non_batch(self) -> Tuple[int, ...]:
        return tuple(sorted(self.rows + self.columns))


def role_of(name: Optional[str]) -> FactorRole:
    for rule_name, role in FACTOR_RULES:
        if name == rule_name:
            return role
    return FactorRole.NONE


def choose_factoring(shape: Sequence[int], names: Optional[Sequence[Optional[str]]], min_dim_size_to_factor: int,
                     where: str = "parameter") -> Factoring:
    """The factoring of a parameter of `shape` whose dimensions have logical `names` (None: unnamed)."""
    ndim = len(shape)
    if names is None:
        if ndim == 2 and min(shape) >= min_dim_size_to_factor:
            return Factoring((), (0,), (1,), True)
        return _unfactored((), ndim)
    names = tuple(names)
    if len(names) != ndim:
        raise ValueError(f"adafactor: {where} has shape {tuple(shape)} but {len(names)} logical axis names "
                         f"{names}; expected one name per dimension")
    roles = [role_of(n) for n in names]
    batch = tuple(d for d, r in enumerate(roles) if r is FactorRole.BATCH)
    rows = tuple(d for d, r in enumerate(roles) if r is FactorRole.ROW)
    columns = tuple(d for d, r in enumerate(roles) if r is FactorRole.COLUMN)
    big_enough = (rows and columns and math.prod(shape[d] for d in rows) >= min_dim_size_to_factor
                  and math.prod(shape[d] for d in columns) >= min_dim_size_to_factor)
    if FactorRole.NONE in roles or not big_enough:
        return _unfactored(batch, ndim)
    return Factoring(batch, rows, columns, True)


def _unfactored(batch: Tuple[int, ...], ndim: int) -> Factoring:
    rest = tuple(d for d in range(ndim) if d not in batch)
    return Factoring(batch, rest, (), False)


class AdafactorState(NamedTuple):
    count: jax.Array  # int32 scalar: updates applied so far
    v_row: Any  # per param: factored row statistics [.., column dims -> 1 ..], else a [1, …, 1] placeholder
    v_col: Any  # per param: factored column statistics [.., row dims -> 1 ..], else a placeholder
    v: Any  # per param: the full second moment when unfactored, else a placeholder
    m: Any  # per param: momentum (None when momentum is off)


def scale_by_adafactor(
    learning_rate: Union[float, Callable[[jax.Array], jax.Array]],
    param_axes: Optional[ParamAxes] = None,
    decay_rate: float = 0.8,
    clipping_threshold: Optional[float] = 1.0,
    multiply_by_parameter_scale: bool = True,
    epsilon1: float = 1e-30,
    epsilon2: float = 1e-3,
    min_dim_size_to_factor: int = 128,
    momentum: Optional[float] = None,
    state_dtype: Any = jnp.float32,
) -> optax.GradientTransformation:
    """Adafactor as an optax transformation whose output is the update to add to the parameters.

    param_axes: a tree like the parameters whose leaves are the logical names of each parameter's dims
      (`nn.get_partition_spec` of the boxed params; `trainer.param_axes(model)`); None: all params unnamed.
    clipping_threshold: None disables update clipping.
    state_dtype: dtype of the stored statistics and momentum ('bfloat16' halves optimizer memory).
    """
    names_by_path = _names_by_path(param_axes)
    state_dtype = jnp.dtype(state_dtype)

    def factoring(path, shape) -> Factoring:
        key = jax.tree_util.keystr(path)
        if names_by_path is None:
            return choose_factoring(shape, None, min_dim_size_to_factor, key)
        if key not in names_by_path:
            raise ValueError(f"adafactor: parameter {key} has no entry in param_axes; expected the logical axis "
                             "names of every parameter (trainer.param_axes(model))")
        return choose_factoring(shape, names_by_path[key], min_dim_size_to_factor, key)

    def init_leaf(path, p):
        plan = factoring(path, p.shape)

        def placeholder():  # a fresh buffer per slot: state built outside jit must be donatable leaf by leaf
            return jnp.zeros((1,) * p.ndim, state_dtype)

        if not plan.factored:
            return placeholder(), placeholder(), jnp.zeros(p.shape, state_dtype)
        return (jnp.zeros(_reduced(p.shape, plan.columns), state_dtype),
                jnp.zeros(_reduced(p.shape, plan.rows), state_dtype), placeholder())

    def init(params):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        stats = [init_leaf(path, p) for path, p in leaves]
        v_row, v_col, v = (jax.tree_util.tree_unflatten(treedef, [s[i] for s in stats]) for i in range(3))
        m = None if momentum is None else jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, state_dtype), params)
        return AdafactorState(jnp.zeros((), jnp.int32), v_row, v_col, v, m)

    def update(updates, state, params=None):
        if multiply_by_parameter_scale and params is None:
            raise ValueError("adafactor: multiply_by_parameter_scale needs the params passed to update()")
        step = (state.count + 1).astype(jnp.float32)
        beta2 = 1.0 - step ** (-decay_rate)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
        columns = [treedef.flatten_up_to(tree) for tree in (state.v_row, state.v_col, state.v)]
        ms = treedef.flatten_up_to(state.m) if momentum is not None else [None] * len(leaves)
        ps = treedef.flatten_up_to(params) if params is not None else [None] * len(leaves)
        results = [
            _update_leaf(g, vr, vc, v, m, p, factoring(path, g.shape), beta2, lr)
            for (path, g), vr, vc, v, m, p in zip(leaves, *columns, ms, ps)
        ]
        out = [jax.tree_util.tree_unflatten(treedef, [r[i] for r in results]) for i in range(5)]
        return out[0], AdafactorState(state.count + 1, out[1], out[2], out[3], out[4] if momentum is not None else None)

    def _update_leaf(g, v_row, v_col, v, m, p, plan: Factoring, beta2, lr):
        grad = g.astype(jnp.float32)
        g2 = grad * grad + epsilon1
        mix = lambda old, new: beta2 * old.astype(jnp.float32) + (1.0 - beta2) * new  # noqa: E731
        if plan.factored:
            v_row = mix(v_row, jnp.mean(g2, axis=plan.columns, keepdims=True))  # [.., rows, 1 ..]
            v_col = mix(v_col, jnp.mean(g2, axis=plan.rows, keepdims=True))  # [.., 1, columns ..]
            row_scale = v_row / jnp.mean(v_row, axis=plan.rows, keepdims=True)
            u = grad * jax.lax.rsqrt(row_scale) * jax.lax.rsqrt(v_col)
        else:
            v = mix(v, g2)
            u = grad * jax.lax.rsqrt(v)
        per_matrix = plan.non_batch  # reductions below are per BATCH index: a scanned layer == an unrolled one
        if clipping_threshold is not None:
            u = u / jnp.maximum(1.0, _rms(u, per_matrix) / clipping_threshold)
        if momentum is not None:
            m = momentum * m.astype(jnp.float32) + (1.0 - momentum) * u
            u = m
            m = m.astype(state_dtype)
        if multiply_by_parameter_scale:
            u = u * jnp.maximum(_rms(p.astype(jnp.float32), per_matrix), epsilon2)
        return ((-lr * u).astype(g.dtype), v_row.astype(state_dtype), v_col.astype(state_dtype),
                v.astype(state_dtype), m)

    return optax.GradientTransformation(init, update)


def _reduced(shape: Sequence[int], dims: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(1 if d in dims else n for d, n in enumerate(shape))


def _rms(x: jax.Array, dims: Tuple[int, ...]) -> jax.Array:
    return jnp.sqrt(jnp.mean(x * x, axis=dims, keepdims=True))


def _names_by_path(param_axes: Optional[ParamAxes]) -> Optional[Dict[str, Tuple[Optional[str], ...]]]:
    """`{keystr(path): names}` from a tree of PartitionSpecs / name tuples (paths as in the params tree)."""
    if param_axes is None:
        return None
    is_spec = lambda x: isinstance(x, (tuple, jax.sharding.PartitionSpec))  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=is_spec)[0]
    return {jax.tree_util.keystr(path): tuple(spec) for path, spec in leaves}
