"""The modules of RetFormer's retrieval cross-fusion: input streams, fusion layers, query readout.

Shapes: B queries, k neighbours, S = k + 1 tokens per stream (slot 0 is the query), d model dim,
H heads of Dh = d / H channels.

- :class:`FusionStreams` builds the two token streams from the query embedding and the neighbours:
  image stream ``I = [proj_q(z); proj_i(image)]``, text stream ``T = [0; proj_t(text)]`` (the query's
  own text slot is always zero: no label leakage through a caption of the query itself).
- :class:`CrossFusionLayer` is one layer, pre-norm: ``I' = Attn(Q=T, K=I, V=I) + I`` and
  ``T' = Attn(Q=I, K=T, V=T) + T``, multi-head, with the neighbour padding mask. Both directions go
  through :func:`retrofit.functional.cross_fusion_attention` (the fused Triton kernel on CUDA).
- :class:`QueryReadout` reads the class logits ``L_R`` from the query tokens ``[I'_0; T'_0]``.

Design choice: a layer has no output projection, exactly the paper's formula. The attention output is
added straight to the residual stream, which lets the fused kernel do the residual add in the same
pass; the next layer's Q/K/V projections (and the readout) absorb any per-head mixing an output
projection would have done. An optional per-stream MLP (``mlp_ratio > 0``, off by default) adds a
transformer-style feed-forward block for users who want more capacity.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from retrofit.functional import cross_fusion_attention

VOTE_FORMS = ("log", "mix")  # LabelVote: log-vote added to the logits, or a probability mixture with the host's
_TINY = 1e-30  # floor of the mixture vote's probabilities before the log (fp32's smallest normal is 1.2e-38)
# |logit| of a mixing weight set by hand: at -1e4 the vote's log-share is -1e4 (below any unmasked class), off under
# any scale set_scale takes (log(3.4e38) = 89); at +1e4 the same for the host
_MIX_LOGIT_MAX = 1e4

__all__ = ["MODALITIES", "VOTE_FORMS", "FusionStreams", "CrossFusionLayer", "QueryReadout", "LabelVote"]

# What each modality setting feeds the streams (the paper's ablations):
#   "image+text": I = [proj_q(z); proj_i(image)], T = [0; proj_t(text)]
#   "image":      neighbour texts removed:  T = [0; 0 ... 0]    (proj_t does not exist)
#   "text":       neighbour images removed: I = [proj_q(z); 0 ... 0]   (proj_i does not exist)
# The architecture is otherwise identical (same layers, same readout, same masks).
MODALITIES = ("image+text", "image", "text")


class FusionStreams(nn.Module):
    """Projects the query embedding and the neighbour vectors into the two (B, S, d) token streams."""

    def __init__(self, query_dim: int, image_dim: int, text_dim: int, dim: int, modalities: str = "image+text",
                 dropout: float = 0.0) -> None:
        super().__init__()
        if modalities not in MODALITIES:
            raise ValueError(f"modalities={modalities!r} is not one of {MODALITIES}")
        self.modalities = modalities
        self.dim = dim
        self.proj_q = nn.Linear(query_dim, dim)
        self.proj_i = nn.Linear(image_dim, dim) if modalities != "text" else None
        self.proj_t = nn.Linear(text_dim, dim) if modalities != "image" else None
        self.drop = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z`` (B, Dq), ``image`` (B, k, Di), ``text`` (B, k, Dt), ``mask`` (B, k) bool.

        Returns ``(I, T, key_mask)``: I and T (B, k+1, d), key_mask (B, k+1) with slot 0 always valid.
        Masked neighbour slots are zero tokens, whatever vectors they held (NaN included).
        """
        B, k = mask.shape
        keep = mask[..., None]  # (B, k, 1)
        # every slot valid (the usual case): the masking is the identity, and its copies of the (B, k, D) neighbour
        # vectors cost more than the projections on a CPU (checked there only: on a GPU, bool() is a sync)
        full = mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(mask.all())
        q_tok = self.proj_q(z)[:, None]  # (B, 1, d)
        if self.proj_i is not None:
            img_tok = (self.proj_i(image) if full
                       else self.proj_i(image.masked_fill(~keep, 0)).masked_fill(~keep, 0))  # (B, k, d)
        else:
            img_tok = q_tok.new_zeros(B, k, self.dim)  # (B, k, d)
        if self.proj_t is not None:
            txt_tok = (self.proj_t(text) if full
                       else self.proj_t(text.masked_fill(~keep, 0)).masked_fill(~keep, 0))  # (B, k, d)
        else:
            txt_tok = q_tok.new_zeros(B, k, self.dim)  # (B, k, d)
        xi = self.drop(torch.cat([q_tok, img_tok], dim=1))  # (B, S, d)
        xt = self.drop(torch.cat([q_tok.new_zeros(B, 1, self.dim), txt_tok], dim=1))  # (B, S, d) query text = 0
        key_mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)  # (B, S)
        return xi, xt, key_mask


class _MLP(nn.Module):
    """Pre-norm feed-forward block with residual (only when ``mlp_ratio > 0``)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class CrossFusionLayer(nn.Module):
    """One cross-fusion layer over the image stream I and the text stream T, pre-norm.

        I' = I + Attn(Q = T_n W_q^T, K = I_n W_k^I, V = I_n W_v^I)     text queries over image keys/values
        T' = T + Attn(Q = I_n W_q^I, K = T_n W_k^T, V = T_n W_v^T)     image queries over text keys/values

    with ``I_n = LayerNorm_I(I)``, ``T_n = LayerNorm_T(T)``, multi-head (``heads``), keys masked by
    ``key_mask`` in both directions. Each stream has one fused Q/K/V projection (d -> 3d): one
    (B*S, d) x (d, 3d) matrix product per stream and layer. Heads are views of the projection output,
    never copies. No output projection (see the module docstring); optional MLP per stream.
    """

    def __init__(self, dim: int = 512, heads: int = 8, mlp_ratio: float = 0.0, dropout: float = 0.0,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        if mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0 (0 = no MLP), got {mlp_ratio}")
        self.dim, self.heads = dim, heads
        self.norm_i = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_t = nn.LayerNorm(dim, eps=norm_eps)
        self.qkv_i = nn.Linear(dim, 3 * dim)  # image stream -> (q_i, k_i, v_i)
        self.qkv_t = nn.Linear(dim, 3 * dim)  # text stream -> (q_t, k_t, v_t)
        hidden = int(round(dim * mlp_ratio))
        self.mlp_i = _MLP(dim, hidden, dropout) if hidden else None
        self.mlp_t = _MLP(dim, hidden, dropout) if hidden else None

    def forward(self, xi: torch.Tensor, xt: torch.Tensor, key_mask: torch.Tensor, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``I``, ``T`` (B, S, d); ``key_mask`` (B, S) bool. Returns ``(I', T', weights)``.

        ``weights`` is None unless ``need_weights``: then ``(p_i, p_t)``, each (B, H, S, S) fp32, the
        attention probabilities of the image-stream update (text queries) and the text-stream update.
        """
        B, S, d = xi.shape
        H, Dh = self.heads, d // self.heads
        qkv_i = self.qkv_i(self.norm_i(xi)).view(B, S, 3, H, Dh)  # (B, S, 3, H, Dh)
        qkv_t = self.qkv_t(self.norm_t(xt)).view(B, S, 3, H, Dh)  # (B, S, 3, H, Dh)
        q_i, k_i, v_i = qkv_i.unbind(2)  # each (B, S, H, Dh), strided views
        q_t, k_t, v_t = qkv_t.unbind(2)  # each (B, S, H, Dh)
        new_i, new_t, w = cross_fusion_attention(
            q_t, k_i, v_i, q_i, k_t, v_t, xi.view(B, S, H, Dh), xt.view(B, S, H, Dh), key_mask,
            need_weights=need_weights,
        )
        xi, xt = new_i.reshape(B, S, d), new_t.reshape(B, S, d)  # (B, S, d), no copy when contiguous
        if self.mlp_i is not None:
            xi, xt = self.mlp_i(xi), self.mlp_t(xt)
        return xi, xt, w


class QueryReadout(nn.Module):
    """``L_R = W · LayerNorm([I'_0; T'_0]) + b``: class logits from the two query tokens.

    Zero-initialised (weight and bias), so an untrained head has ``L_R = 0`` exactly.
    """

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * dim, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, xi: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        h = torch.cat([xi[:, 0], xt[:, 0]], dim=-1)  # (B, 2d)
        return self.fc(self.drop(self.norm(h)))  # (B, C)


def mixing_logit(a: float) -> float:
    """The logit of a mixing weight ``a`` in [0, 1], kept within +-1e4 (``LabelVote.set_weight`` of a mix vote)."""
    u = math.log(a / (1.0 - a)) if 0.0 < a < 1.0 else math.copysign(_MIX_LOGIT_MAX, a - 0.5)
    return max(-_MIX_LOGIT_MAX, min(_MIX_LOGIT_MAX, u))


def mix_log_probs(host: torch.Tensor, vote: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``log((1 - a) exp(host) + a exp(vote))`` (B, C) for log-probabilities ``host`` and ``vote`` and the
    mixing logit ``u = logit(a)`` (a 0-d tensor, -inf = no vote), renormalised per row; classes ``host`` masks
    (-inf) stay -inf, with zero gradient (``logaddexp(-inf, -inf)`` would give NaN ones)."""
    masked = torch.isneginf(host)  # (B, C)
    out = torch.logaddexp(F.logsigmoid(-u) + host.masked_fill(masked, 0.0),
                          F.logsigmoid(u) + vote.masked_fill(masked, 0.0))
    out = out.masked_fill(masked, float("-inf"))
    return out - out.logsumexp(dim=1, keepdim=True)  # the mass lost to masks or to an empty vote


class LabelVote(nn.Module):
    """Optional learned, label-aware neighbour vote (``HeadConfig.label_vote``; not in the paper).

    ``V = beta * log(eps + sum_j softmax_j(s_j / t) onehot(y_j))`` (eps 0.2 chosen on the CIFAR-10-LT demo's
    validation set among 0.01-1) over the valid neighbours (slots with a
    label >= 0), with a learned weight ``beta`` (zero-initialised: a fresh log-form head still adds nothing) and a
    learned temperature ``t`` over the retrieval similarities ``s``. Both are stored as ``param / gain``:
    Adam's step is scale-free, so ``gain`` multiplies their effective learning rate (two scalars that must
    travel far, trained with the small lr of the attention weights).

    ``scale`` (a buffer, 1 by default, saved with the head) multiplies ``beta`` at use: a post-hoc calibration,
    chosen on labelled validation data, for a head moved to another knowledge base (a denser or cleaner KB's
    vote deserves more weight than training on a smaller one taught). :meth:`set_scale` sets it.

    ``form="mix"`` (``HeadConfig.vote_form``) mixes probabilities instead of adding log-votes:
    ``log((1 - a) * softmax(F) + a * p)`` for the fused logits ``F = tau/2 * (L_I + L_R)`` and the vote ``p``
    above, with a learned mixing weight ``a = sigmoid(gain * weight + log(scale))`` (``scale`` multiplies its
    odds ``a / (1 - a)``; 0 turns the vote off). It starts at ``a = 0.5``: with a zero readout that is the fixed
    rule ``0.5 * softmax(L_I) + 0.5 * kNN`` a learned head has to beat (exactly so for an unbalanced vote; a
    balanced one divides the kNN by the KB's class frequencies), which the log form cannot express. The result is
    renormalised per row: a class the fused logits mask with -inf stays masked (the vote's share for it goes to
    the other classes), and a row without any labelled neighbour gets the fused logits' own log-probabilities.
    Only -inf masks: a large finite negative logit (-1e4) still receives the vote's share.
    """

    def __init__(self, num_classes: int, temperature: float = 0.05, eps: float = 0.2, gain: float = 20.0,
                 form: str = "log") -> None:
        super().__init__()
        if not temperature > 0 or not eps > 0 or not gain > 0:
            raise ValueError(f"LabelVote needs temperature, eps, gain > 0, got {temperature}, {eps}, {gain}")
        if form not in VOTE_FORMS:
            raise ValueError(f"LabelVote form must be one of {VOTE_FORMS}, got {form!r}")
        self.num_classes, self.eps, self.gain, self.form = num_classes, eps, gain, form
        self.weight = nn.Parameter(torch.zeros(()))  # beta / gain ("mix": the mixing weight's logit / gain)
        self.log_temperature = nn.Parameter(torch.tensor(float(torch.tensor(temperature).log())) / gain)
        self.register_buffer("label_log_prior", torch.zeros(num_classes))  # (C,) 0 = no rebalancing
        self.register_buffer("scale", torch.ones(()))  # post-hoc multiplier of beta (set_scale)

    def _number(self, value: float, what: str, low: float) -> float:
        """``value`` as a float if it is a real number in [low, fp32 max] (numpy scalars included), else ValueError."""
        big = float(torch.finfo(self.weight.dtype).max) / self.gain
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and low <= float(value) <= big
        if not ok:
            raise ValueError(f"vote {what} must be a finite number in [{low:.3g}, {big:.3g}], got {value!r}")
        return float(value)

    def set_scale(self, scale: float) -> None:
        """Multiply the learned vote weight (``form="mix"``: the odds of its mixing weight) by ``scale`` (>= 0)
        from now on; 1 restores the trained vote, 0 turns it off."""
        self.scale.fill_(self._number(scale, "scale", 0.0))

    def set_weight(self, weight: float) -> None:
        """Set the vote weight in use (``beta * scale``) to ``weight``, of either sign (``form="mix"``: the mixing
        weight ``a``, in [0, 1], its logit kept within +-1e4: 0 turns the vote off, 1 the host): the learned one is
        replaced and the scale reset to 1 (saved with the head). A post-hoc calibration on labelled validation data
        for a head whose training left the vote near zero or negative (trained on noisy labels, then moved to a cleaner
        knowledge base), which no multiple of the trained weight (:meth:`set_scale`) can reach."""
        if self.form == "mix":
            ok = isinstance(weight, numbers.Real) and not isinstance(weight, bool) and 0.0 <= float(weight) <= 1.0
            if not ok:
                raise ValueError(f"the mixing weight of a vote_form='mix' vote must be a number in [0, 1], got "
                                 f"{weight!r}")
            with torch.no_grad():
                self.weight.fill_(mixing_logit(float(weight)) / self.gain)
            self.scale.fill_(1.0)
            return
        weight = self._number(weight, "weight", -float(torch.finfo(self.weight.dtype).max) / self.gain)
        with torch.no_grad():
            self.weight.fill_(weight / self.gain)
        self.scale.fill_(1.0)

    def set_temperature(self, temperature: float) -> None:
        """Set the softmax temperature of the vote over the retrieval similarities (> 0), replacing the learned one
        (saved with the head): a post-hoc calibration, chosen on labelled data, for a head moved to a knowledge
        base whose similarities are spread differently (a denser one deserves a softer vote over more neighbours)."""
        t = self._number(temperature, "temperature", 1e-6)
        with torch.no_grad():
            self.log_temperature.fill_(math.log(t) / self.gain)

    @property
    def temperature(self) -> float:
        """The vote's softmax temperature in use (learned, or set by :meth:`set_temperature`)."""
        return float((self.log_temperature.detach() * self.gain).exp())

    @property
    def effective_weight(self) -> float:
        """The vote weight in use: ``beta * scale`` (``form="mix"``: the mixing weight ``a``)."""
        if self.form == "mix":
            return float(self.mix_logit().detach().double().sigmoid())
        return float(self.weight.detach() * self.gain * self.scale)

    def mix_logit(self) -> torch.Tensor:
        """``form="mix"``: the logit of the mixing weight in use, ``gain * weight + log(scale)`` (-inf at scale 0)."""
        return self.weight * self.gain + self.scale.log()

    def set_label_prior(self, counts: torch.Tensor | None) -> None:
        """Rebalance the vote by the knowledge base's label counts (C,): each class's share is divided by its
        frequency, so a head moved to a KB with another class mix sees the same kind of vote. None = off."""
        if counts is None:
            self.label_log_prior.zero_()
            return
        c = torch.as_tensor(counts, dtype=torch.float32)
        if c.shape != (self.num_classes,):
            raise ValueError(f"label counts must have shape ({self.num_classes},), got {tuple(c.shape)}")
        if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
            raise ValueError(f"label counts must be finite numbers >= 0, got {c.tolist()[:10]}")
        c = c.clamp_min(1.0)
        self.label_log_prior.copy_((c / c.sum()).log() + torch.log(torch.tensor(float(self.num_classes))))

    def probs(self, labels: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C) similarity-weighted label distribution of the neighbours (all zeros when none is valid)."""
        valid = mask & (labels >= 0)  # (B, k)
        t = (self.log_temperature * self.gain).exp()
        # fp32 at least, fp64 for an fp64 head (its neighbours' scores stay fp32: Neighbors.to casts the vectors
        # only): the prior's exp and the softmax overflow in half precision
        dtype = torch.promote_types(torch.promote_types(scores.dtype, self.log_temperature.dtype), torch.float32)
        scores = scores.to(dtype)
        # mask after dividing, from finite values: -inf / t would give the temperature a NaN gradient (inf * 0)
        # whenever a slot is invalid (an unknown label, a masked slot) or a valid one scores -inf (least similar:
        # no weight), and one NaN step disables the vote for good
        finite = valid & torch.isfinite(scores)
        s = (scores.masked_fill(~finite, 0.0) / t).masked_fill(~finite, float("-inf"))  # (B, k)
        w = torch.softmax(s, dim=1).nan_to_num(0.0) * finite  # (B, k)
        p = w.new_zeros(labels.shape[0], self.num_classes)  # (B, C)
        p = p.scatter_add(1, labels.clamp_min(0), w)
        # (B, C) divided by the KB's (relative) class frequency, in p's precision: a rare class's 1 / share
        # (N / (count * C)) passes fp16's range for a KB of ~1M entries
        rebalanced = p * (-self.label_log_prior.to(p.dtype)).exp()
        rebalanced = rebalanced / rebalanced.sum(1, keepdim=True).clamp_min(1e-12)
        # a tensor select, not an `if`: torch.compile traces it without a graph break
        return torch.where(self.label_log_prior.any(), rebalanced, p)

    def forward(self, labels: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``labels`` (B, k) int64, ``scores`` (B, k), ``mask`` (B, k) bool -> (B, C) vote logits (``form="log"``,
        added to the readout's), or the vote's log-probabilities (``form="mix"``: :meth:`mix` takes them)."""
        p = self.probs(labels, scores, mask)
        if self.form == "mix":
            return p.clamp_min(_TINY).log()  # a class no neighbour votes for: log(1e-30), finite
        return self.weight * self.gain * self.scale * (p + self.eps).log()

    def mix(self, logits: torch.Tensor, vote_log_probs: torch.Tensor) -> torch.Tensor:
        """``form="mix"``: ``log((1 - a) softmax(logits) + a exp(vote_log_probs))`` (B, C), in a stable form
        (log-sigmoids of the mixing logit: no NaN gradient when ``a`` saturates), in ``logits``' dtype, renormalised
        per row. Classes whose logit is -inf (masked by the host) stay -inf, with zero gradient (not NaN, also at
        ``a = 0``)."""
        dt = torch.promote_types(logits.dtype, torch.float32)
        host = torch.log_softmax(logits.to(dt), dim=1)
        return mix_log_probs(host, vote_log_probs.to(dt), self.mix_logit().to(dt)).to(logits.dtype)
