"""MiniMoE: a student with top-1 mixture-of-experts FFNs, as big as you like at the dense student's compute.

Zhang, Yang, Liu, Song, "Lifting the Curse of Capacity Gap in Distilling Language Models", ACL 2023
(arXiv 2305.12129); official code GeneZC/MiniMoE (``modules/modeling_moebert_gate.py``,
``models/moebert_minilm.py``).

Implements:
- ``MoEFFN``: the MiniMoE feed-forward block. A router Linear(d -> E) gives logits; in training
  uniform noise U(-eps, eps) is added to them (eps = hidden dropout 0.1 in the official code);
  p = softmax(logits); each token goes to its argmax expert only (top-1), and that expert's FFN
  output is multiplied by p[expert], which is the router's only path to a gradient from the task
  loss. It also returns the Switch load balance E * sum_e me_e * ce_e, me = mean of the soft
  probabilities, ce = fraction of tokens hard-assigned to e (only me carries a gradient).
- ``minimoe_mlp``: an MLP student built from post-LN residual blocks x = LayerNorm(x + MoEFFN(x)),
  the BERT FFN sublayer with the attention sublayer left out; ``num_experts=1`` is the dense student.
- ``active_parameters``: parameters one token uses, so MoE and dense students are compared at equal
  active compute (the paper's claim: more parameters, no extra FLOPs).
- ``relation_kd_loss``: the MiniLMv2 self-attention relation distillation MiniMoE trains with:
  Q, K, V of teacher and student re-split into the same number of relation heads,
  R = softmax(X X^T / sqrt(d_r)), loss = mean over Q, K, V of KL(R_teacher || R_student).
  Training objective in the paper: relation_kd_loss + 0.01 * load balance.

Departs from the paper / official code:
- Inputs are images, one token per image, and there is no attention sublayer (the official default
  ``--moe 1,4`` has no attention experts either). Relation distillation needs sequences, so it does
  not apply to ``minimoe_mlp``; it is here for sequence students, and the MLP experiments distil
  logits instead.
- Experts are initialised independently (nn.Linear's default init). The official ``moefy`` cuts E
  experts out of one randomly initialised wide FFN so that they start as copies sharing 2/3 of their
  neurons; for a student trained from scratch that is only a different random start, and
  independent experts keep the module to four stacked tensors.
- Noise is U(-eps, eps); the official 1 + U(-eps, eps) adds a constant that softmax and argmax ignore.
- With one expert there is no router: the official dense path never calls its Linear(d -> 1) gate
  either, and softmax over one logit is exactly 1. Its load balance is the constant 1, as there.
- No dropout before the gate scaling (the official BertOutput has hidden dropout 0.1 there).
- ``relation_kd_loss`` masks padded keys to probability exactly 0 (the official adds -10000 to the
  scores, which gives 0 in fp32 as well) and applies no dropout to the student's relations (the
  official student drops 10 % of its relation probabilities in training), so the loss is a
  deterministic function of Q, K, V. The reduction is the official one: KL per (head, non-padded
  query) row of F.kl_div(log(s + 1e-7), t + 1e-7), summed and divided by the number of rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tasks.common.registry import register_loss, register_model


class MoEFFN(nn.Module):
    """Top-1 routed experts, each Linear(d, d_ff) -> GELU -> Linear(d_ff, d), stored stacked [E, ...]."""

    def __init__(self, d: int, d_ff: int, num_experts: int, noise: float = 0.1):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts, self.noise = num_experts, noise  # noise: epsilon of the uniform router noise
        # one expert needs no router: p = softmax(one logit) = 1 always
        self.router = nn.Linear(d, num_experts) if num_experts > 1 else None
        self.w1 = nn.Parameter(torch.empty(num_experts, d_ff, d))
        self.b1 = nn.Parameter(torch.empty(num_experts, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d, d_ff))
        self.b2 = nn.Parameter(torch.empty(num_experts, d))
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):  # nn.Linear's default, per expert
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        # tokens routed to each expert in the last forward, for utilisation metrics
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.long),
                             persistent=False)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's FFN on tokens x [n, d] (no gate)."""
        return F.linear(F.gelu(F.linear(x, self.w1[e], self.b1[e])), self.w2[e], self.b2[e])

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens [N, d] -> (logits incl. training noise, probabilities p [N, E], chosen expert [N])."""
        if self.router is None:
            ones = x.new_ones(x.shape[0], 1)
            return ones, ones, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        logits = self.router(x)
        if self.training and self.noise > 0:  # exploration noise: ties between experts break randomly
            logits = logits + torch.empty_like(logits).uniform_(-self.noise, self.noise)
        p = logits.softmax(-1)
        return logits, p, p.argmax(-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., d] -> (gate-scaled expert outputs [..., d], load balance scalar)."""
        tokens = x.reshape(-1, x.shape[-1])
        _, p, top = self.route(tokens)
        gate = p.gather(1, top[:, None])  # p[expert]: argmax has no gradient, this product does
        out = tokens.new_zeros(tokens.shape)
        for e in range(self.num_experts):  # each token runs through one expert only
            idx = (top == e).nonzero(as_tuple=True)[0]
            if idx.numel():
                out[idx] = gate[idx] * self.expert(e, tokens[idx])
        counts = torch.bincount(top, minlength=self.num_experts)
        self.tokens_per_expert.copy_(counts)
        # Switch load balance: me from soft probabilities (differentiable), ce from hard assignments
        me, ce = p.mean(0), counts.to(p.dtype) / top.numel()
        return out.reshape(x.shape), self.num_experts * (me * ce).sum()


class MiniMoEMLP(nn.Module):
    """flatten -> Linear(in_features, d_model) -> num_layers x [LayerNorm(x + MoEFFN(x))] -> Linear."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, d_model: int = 64, d_ff: int = 64,
                 num_layers: int = 2, num_experts: int = 4, noise: float = 0.1):
        super().__init__()
        self.embed = nn.Linear(in_features, d_model)
        self.ffns = nn.ModuleList(MoEFFN(d_model, d_ff, num_experts, noise) for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_layers))  # post-LN as in BERT
        self.head = nn.Linear(d_model, num_classes)
        self._load_balances: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1))  # one token per image
        self._load_balances = []
        for ffn, norm in zip(self.ffns, self.norms):
            y, lb = ffn(h)
            h = norm(h + y)
            self._load_balances.append(lb)
        return self.head(h)

    def load_balance(self) -> torch.Tensor:
        """Mean over layers of the last forward's load balance (add 0.01 x this to the loss)."""
        if not self._load_balances:
            raise RuntimeError("load_balance() needs a forward pass first")
        return torch.stack(self._load_balances).mean()

    def aux_outputs(self) -> dict[str, torch.Tensor]:
        """Step outputs beside the logits that loss terms can name (the ``load_balance`` loss)."""
        return {"load_balance": self.load_balance()}

    def expert_utilisation(self) -> torch.Tensor:
        """[num_layers, num_experts]: fraction of the last forward's tokens each expert received."""
        counts = torch.stack([ffn.tokens_per_expert for ffn in self.ffns]).float()
        return counts / counts.sum(1, keepdim=True).clamp_min(1)


# the class itself, not a wrapper: the registry reads the constructor's signature (registry.data_kwargs)
minimoe_mlp = register_model("minimoe_mlp")(MiniMoEMLP)


@register_loss("load_balance")
def load_balance_loss(load_balance: torch.Tensor) -> torch.Tensor:
    """The Switch load-balance term a MoE student reports (weight 0.01 in the paper; 0 = the ablation)."""
    return load_balance


def utilisation_entropy(utilisation: torch.Tensor) -> float:
    """Mean over layers of the entropy of the experts' token shares, in units of log E (1 = uniform)."""
    e = utilisation.shape[-1]
    if e == 1:
        return 1.0
    h = -(utilisation * utilisation.clamp_min(1e-12).log()).sum(-1) / math.log(e)
    return float(h.mean())


def active_parameters(model: nn.Module, include_router: bool = False) -> int:
    """Parameters one token uses: everything outside the MoE blocks plus one expert per MoE block.

    Routers are left out by default: they are the routing overhead (d x E + E per layer, E/(2 d_ff)
    of an expert's multiply-adds), the cost the paper's "no extra FLOPs" also leaves out. So the MoE
    student's active count equals the dense (num_experts=1, router-free) student's total count.
    """
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, MoEFFN):
            per_expert = sum(w.numel() for w in (m.w1, m.b1, m.w2, m.b2)) // m.num_experts
            total -= per_expert * (m.num_experts - 1)
            if m.router is not None and not include_router:
                total -= sum(p.numel() for p in m.router.parameters())
    return total


def _relations(x: torch.Tensor, heads: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, S, H] -> softmax(X_h X_h^T / sqrt(d_r)) per relation head, [B, heads, S, S]."""
    b, s, hidden = x.shape
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of {heads} relation heads")
    d_r = hidden // heads
    xh = x.reshape(b, s, heads, d_r).transpose(1, 2)
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(d_r)
    if key_mask is not None:  # padded keys get probability exactly 0
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.softmax(-1)


def relation_kd_loss(teacher_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     student_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     num_relation_heads: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLMv2 Q-Q, K-K, V-V relation distillation: (KL_QQ + KL_KK + KL_VV) / 3, teacher detached.

    Each of Q, K, V is [batch, seq, hidden]; teacher and student hidden sizes may differ, both are cut
    into ``num_relation_heads`` heads (32 in MiniMoE). ``attention_mask`` [batch, seq] is 1 for real
    tokens, 0 for padding: padded keys are masked out of the softmax, padded query rows are dropped.
    KL is the official F.kl_div(log(s + 1e-7), t + 1e-7, "batchmean"): a sum over all rows divided
    by the number of rows (batch x heads x real queries), i.e. the mean KL per relation row.
    """
    mask = None if attention_mask is None else attention_mask.bool()
    losses = []
    for t, s in zip(teacher_qkv, student_qkv):
        r_t = _relations(t.detach(), num_relation_heads, mask)
        r_s = _relations(s, num_relation_heads, mask)
        if mask is not None:  # keep rows of real queries only -> [rows, seq]
            rows = mask[:, None, :].expand(r_s.shape[:3])
            r_t, r_s = r_t[rows], r_s[rows]
        r_t, r_s = r_t.reshape(-1, r_t.shape[-1]), r_s.reshape(-1, r_s.shape[-1])
        losses.append(F.kl_div(torch.log(r_s + 1e-7), r_t + 1e-7, reduction="batchmean"))
    return torch.stack(losses).mean()


@register_loss("relation_kd")
def relation_kd(teacher_qkv, student_qkv, attention_mask: torch.Tensor,
                num_relation_heads: int = 32) -> torch.Tensor:
    """``relation_kd_loss`` as a loss term: a job supplies the last layer's Q, K, V of teacher and
    student and the attention mask when a term asks for them (32 relation heads, as MiniMoE)."""
    return relation_kd_loss(teacher_qkv, student_qkv, num_relation_heads, attention_mask)
