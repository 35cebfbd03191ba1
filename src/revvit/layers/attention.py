"""Global multi-head self-attention through `scaled_dot_product_attention`, and Rev-ViT's F branch."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reversible.hooks import has_hooks
from ..reversible.pieces import split_inside
from .coupling import PreNormCoupling, add_bias, add_bias_grad, add_grad, scale_rows
from .linear import Linear, add_weight_grads, adds_into_grad, linear_parts


def head_rows(part: int, parts: int, num_heads: int, head_dim: int) -> slice:
    """The output rows of a q/k/v projection (and input columns of `proj`) of the `part`-th of `parts`
    nearly equal groups of heads."""
    if not 0 <= part < parts <= num_heads:
        raise ValueError(f"part {part} of {parts} does not name a group of {num_heads} heads")
    lo, hi = part * num_heads // parts, (part + 1) * num_heads // parts
    return slice(lo * head_dim, hi * head_dim)


def linear_rows(layers: list[nn.Linear], x: Tensor, rows: list[slice]) -> list[Tensor]:
    """`[layer(x)[..., r] for layer, r in zip(layers, rows)]` as one matrix product over those weight rows
    only (one product: its gradient w.r.t. x is made once, not once per layer)."""
    out = linear_parts(x, [(layer.weight, layer.bias, r, slice(None)) for layer, r in zip(layers, rows)])
    return list(out.split([r.stop - r.start for r in rows], dim=-1))


def project_heads(proj: nn.Linear, x: Tensor, rows: slice) -> Tensor:
    """The share of `proj`'s output that comes from the input columns `rows` (the bias goes with the
    group that starts at column 0): summed over all groups it is `proj` of the concatenated heads."""
    return linear_parts(x, [(proj.weight, proj.bias if rows.start == 0 else None, slice(None), rows)])


class Attention(nn.Module):
    """(B, N, C) -> (B, N, C). Separate q, k, v projections (the official Rev-ViT layout) and `proj`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.k = Linear(dim, dim, bias=qkv_bias)
        self.v = Linear(dim, dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)

    def forward(self, x: Tensor) -> Tensor:
        if split_inside() and self._plain():  # recomputed by the engine, in pieces?
            params = tuple(t for layer in (self.q, self.k, self.v, self.proj) for t in (layer.weight, layer.bias))
            if adds_into_grad(x, params):
                return _RecomputedAttention.apply(x, params, self.num_heads)
        b, n, c = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))

    def _plain(self) -> bool:
        """Projections, attention without dropout and nothing else (no hooks, no layer with its own forward):
        what `_RecomputedAttention` computes, bypassing the modules' calls."""
        layers = (self.q, self.k, self.v, self.proj)
        return ((self.attn_drop == 0.0 or not self.training) and isinstance(self.proj_drop, nn.Identity)
                and all(type(m) in (Linear, nn.Linear) and not has_hooks(m) for m in layers))

    # -- the reversible engine's coupling run by attention itself (see layers/coupling.py) ------------------

    def head_groups(self, forward: bool = False) -> list[slice]:
        """The columns of q, k, v (and of proj's input) of each group of heads the coupling goes through.
        Backward: a sixth of the heads each (at least one), so that a group's q, k, v, output and their
        gradients together are about one input's size. Forward (no gradients): half of the heads (rounded
        down; one at a time for 3)."""
        per = max(1, self.num_heads // (2 if forward else 6))
        return [slice(h * self.head_dim, min(h + per, self.num_heads) * self.head_dim)
                for h in range(0, self.num_heads, per)]

    def coupling_units(self, forward: bool) -> float:
        """What `add_into` (forward) or `subtract_and_backprop` holds, in units of its input: the input's
        LayerNorm output (and its gradient) and one group's q, k, v, output (and their gradients)."""
        group = max(c.stop - c.start for c in self.head_groups(forward)) / self.q.in_features
        return 1 + 5 * group if forward else 2 + 8 * group  # Rev-ViT-S backward: 3.33, measured 3.35

    def _group_qkv(self, x: Tensor, cols: slice, batch: int) -> list[Tensor]:
        """q, k, v of the heads in `cols`, (B, heads, N, head_dim), from x's rows (B * N, C)."""
        heads = (cols.stop - cols.start) // self.head_dim
        return [F.linear(x, layer.weight[cols], layer.bias[cols] if layer.bias is not None else None)
                .view(batch, -1, heads, self.head_dim).transpose(1, 2) for layer in (self.q, self.k, self.v)]

    def add_into(self, out: Tensor, x: Tensor, mask: Optional[Tensor]) -> None:
        """out += mask * self(x) without a graph, a group j of heads at a time::

            O_j  = attention(X Wq[j]^T + bq[j], X Wk[j]^T + bk[j], X Wv[j]^T + bv[j])
            out += (mask * O_j) Wp[:, j]^T          its share of the output (then out += mask * bp)
        """
        batch, wp = x.shape[0], self.proj.weight
        x2, o2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        for cols in self.head_groups(forward=True):
            o = F.scaled_dot_product_attention(*self._group_qkv(x2, cols, batch))
            o = scale_rows(o.transpose(1, 2).reshape(-1, cols.stop - cols.start), mask, batch)
            o2.addmm_(o, wp[:, cols].t())
            del o
        add_bias(out, self.proj.bias, mask)

    def subtract_and_backprop(self, out: Optional[Tensor], x: Tensor, d: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Undo `add_into` (out -= mask * self(x); out None: nothing to undo) and back-propagate d out = d:
        the parameters' gradients go into `.grad`; returns d x. Group by group in reverse, each group's
        share of the output and its gradients made from one attention::

            O_j = attention(Q_j, K_j, V_j), with its graph
            out -= (mask * O_j) Wp[:, j]^T          the rebuild: the product `add_into` added, made again
            dWp[:, j] += dY^T (mask * O_j)
            dO_j = mask * (dY Wp[:, j])
            dQ_j, dK_j, dV_j = attention's backward
            dWq[j] += dQ_j^T X,  dbq[j] += sum dQ_j,  dX += dQ_j Wq[j]      (and k, v)
        """
        batch, wp = x.shape[0], self.proj.weight
        x2, d2 = x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])
        if out is not None:
            add_bias(out, self.proj.bias, mask, sign=-1)
        add_bias_grad(self.proj.bias, d, mask)
        dx = None
        for cols in reversed(self.head_groups()):
            width = cols.stop - cols.start
            leaves = [t.detach().requires_grad_(True) for t in self._group_qkv(x2, cols, batch)]
            with torch.enable_grad():
                o = F.scaled_dot_product_attention(*leaves)
            o_j = o.detach().transpose(1, 2).reshape(-1, width)
            if mask is not None:  # not in place: o_j may be o itself, which attention's backward reads
                o_j = (o_j.view(batch, -1, width) * mask.reshape(batch, 1, 1)).view(-1, width)
            if out is not None:
                out.view(-1, out.shape[-1]).addmm_(o_j, wp[:, cols].t(), alpha=-1)
            add_grad(wp, d2, o_j, cols=cols)
            del o_j
            d_o = scale_rows(d2 @ wp[:, cols], mask, batch).view(batch, -1, width // self.head_dim, self.head_dim)
            d_qkv = list(torch.autograd.grad(o, leaves, d_o.transpose(1, 2)))
            del o, leaves, d_o
            for layer in (self.q, self.k, self.v):  # each gradient released once used
                g = d_qkv.pop(0).transpose(1, 2).reshape(-1, width)
                add_grad(layer.weight, g, x2, rows=cols, bias=layer.bias)
                dx = g @ layer.weight[cols] if dx is None else dx.addmm_(g, layer.weight[cols])
                del g
        return dx.view(x.shape)

    def fusable(self) -> bool:
        return type(self).forward is Attention.forward and self._plain()

    def forward_part(self, x: Tensor, part: int, parts: int) -> Tensor:
        """The contribution of the `part`-th of `parts` groups of heads: the sum over all parts is
        `forward(x)` (up to rounding), and each part only computes its own heads' q, k, v and attention."""
        b, n, _ = x.shape
        rows = head_rows(part, parts, self.num_heads, self.head_dim)
        heads = (rows.stop - rows.start) // self.head_dim
        q, k, v = (t.reshape(b, n, heads, self.head_dim).transpose(1, 2)
                   for t in linear_rows([self.q, self.k, self.v], x, [rows] * 3))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(project_heads(self.proj, x.transpose(1, 2).reshape(b, n, -1), rows))


class _RecomputedAttention(torch.autograd.Function):
    """Multi-head attention over the engine's stand-in parameters (see `layers.linear`), computed as
    `Attention.forward` computes it (the same products, so the same output), and back-propagated one group
    of heads j at a time, each group's gradients written over its own q, k, v (no longer needed). Used
    when the engine splits its recomputation to save memory (`split_inside`)::

        dWp[:, j] += dY^T O_j                       (dbp += sum dY once)
        dO_j = dY Wp[:, j]
        dQ_j, dK_j, dV_j = attention's backward for heads j (their graph, kept from the forward, then freed)
        Q_j, K_j, V_j <- dQ_j, dK_j, dV_j
    then, whole:
        dWq += dQ^T X,  dbq += sum dQ               (and k, v)
        dX = dQ Wq + dK Wk + dV Wv

    so beyond q, k, v only one group's gradients are alive (autograd's graph makes dO and all of dQ, dK,
    dV next to q, k, v). Heads' outputs and gradients are laid out (B, N, heads, head_dim): a group's
    columns are views. q, k, v belong to this Function alone and are kept on `ctx`.
    """

    @staticmethod
    def forward(ctx, x: Tensor, params: tuple, num_heads: int) -> Tensor:
        wq, bq, wk, bk, wv, bv, wp, bp = params
        b, n, c = x.shape
        hd = c // num_heads
        ctx.qkv = [F.linear(x, w, bias) for w, bias in ((wq, bq), (wk, bk), (wv, bv))]
        q, k, v = (t.view(b, n, num_heads, hd).transpose(1, 2) for t in ctx.qkv)
        o = x.new_empty(b, n, c)  # the heads' outputs side by side, proj's input
        ctx.groups = []
        groups = min(HEAD_GROUPS, num_heads)
        for j in range(groups):
            heads = head_rows(j, groups, num_heads, 1)
            with torch.enable_grad():  # attention's own graph for these heads, kept for the backward
                leaves = [t[:, heads].detach().requires_grad_(True) for t in (q, k, v)]
                out = F.scaled_dot_product_attention(*leaves)
            o.view(b, n, num_heads, hd)[:, :, heads] = out.detach().transpose(1, 2)
            ctx.groups.append((head_rows(j, groups, num_heads, hd), leaves, out))
        ctx.save_for_backward(x)
        ctx.params = params
        return F.linear(o, wp, bp)

    @staticmethod
    def backward(ctx, dy: Tensor):
        if not ctx.groups:
            raise RuntimeError("the reversible engine's recomputed attention was back-propagated twice "
                               "(retain_graph); its heads' graphs are used up by the first backward")
        (x,), groups, qkv = ctx.saved_tensors, ctx.groups, ctx.qkv
        ctx.groups, ctx.qkv = [], None
        wq, bq, wk, bk, wv, bv, wp, bp = ctx.params
        b, n, c = x.shape
        dy2, x2 = dy.contiguous().view(-1, c), x.reshape(-1, c)
        for j in range(len(groups)):
            cols, leaves, out = groups[j]
            groups[j] = None  # this group's graph goes with its gradients
            heads = out.shape[1]
            o_j = out.detach().transpose(1, 2).reshape(-1, cols.stop - cols.start)
            add_weight_grads(wp, bp if j == 0 else None, dy2, o_j, cols=cols)
            d_out = (dy2 @ wp[:, cols]).view(b, n, heads, -1).transpose(1, 2)
            d_leaves = torch.autograd.grad(out, leaves, d_out)
            for leaf, d in zip(leaves, d_leaves):
                _alias(leaf).copy_(d)
            del out, o_j, leaves, d_out, d_leaves
        dx = None
        for (w, bias), d in zip(((wq, bq), (wk, bk), (wv, bv)), qkv):  # q, k, v now hold dQ, dK, dV
            d2 = d.view(-1, c)
            add_weight_grads(w, bias, d2, x2)
            if ctx.needs_input_grad[0]:
                dx = d2 @ w if dx is None else dx.addmm_(d2, w)
        del qkv, d, d2
        return (dx.view(x.shape) if dx is not None else None), None, None


def _alias(t: Tensor) -> Tensor:
    """`t`'s memory under a version counter of its own: the graphs of the groups not yet back-propagated
    hold views of the same q, k, v (other heads' columns, never written here), which autograd's check of
    in-place changes would otherwise refuse."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


HEAD_GROUPS = 4  # how many groups of heads `_RecomputedAttention`'s backward goes through (at most one per head)


class AttentionBranch(PreNormCoupling, nn.Module):
    """F of Rev-ViT: LayerNorm -> multi-head self-attention, (B, N, D) -> (B, N, D). No residual: the
    stream adds it. In the reversible engine its coupling is fused: a group of heads at a time (`PreNormCoupling`)."""

    per_sample = True  # no batch statistics: the reversible engine may recompute it over slices of the batch

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)

    @property
    def max_parts(self) -> int:
        """F is a sum over its heads: the reversible engine may recompute it one group of heads at a time."""
        return self.attn.num_heads

    def body(self) -> Attention:
        return self.attn

    def forward_part(self, x: Tensor, part: int, parts: int) -> Tensor:
        return self.attn.forward_part(self.norm(x), part, parts)
