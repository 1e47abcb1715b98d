"""Student-side heads: Q-values of a transformers causal LM at the states of a :class:`~tokenrl.buffer.Batch`.

The student's logits are its Q-function. The network itself (any ``AutoModelForCausalLM``) knows nothing
about training; this module turns a batch into per-state hidden states and then into either dense logits
``[B, S, V]`` or *sparse* logits on candidate ids ``[B, S, K]`` computed as ``h @ W[ids]^T``, which costs
O(K) per state instead of O(|V|). Both paths give the same numbers and gradients (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenrl.backup import token_nll, upcast
from tokenrl.buffer import Batch


SPARSE_GATHER_ELEMENTS = 1 << 24
"""Largest gathered head ``[B, S, K, D]`` (elements) :meth:`CausalLMPolicy.sparse_logits` builds before it
switches to dense logits gathered at the candidates (when those are smaller)."""


@dataclass
class CandidateQ:
    """Student logits on each state's candidate set.

    Attributes:
        logits_BSK: ``[B, S, K]`` student logits of the candidates (K = V for the dense form).
        mask_BSK: ``[B, S, K]`` bool candidate validity (states past the response end are all False).
        action_slot_BT: ``[B, T]`` slot of the taken action among the candidates, -1 if outside the set or on
            padding (for the dense form the slot is the token id itself).
        vocab_max_BS: ``[B, S]`` the student's max logit over the whole vocabulary (differentiable through
            the argmax row), used by Bellman Distill's Q shift; None unless asked for.
    """

    logits_BSK: torch.Tensor
    mask_BSK: torch.Tensor
    action_slot_BT: torch.Tensor
    vocab_max_BS: torch.Tensor | None = None

    @property
    def action_in_set_BT(self) -> torch.Tensor:
        """``[B, T]`` bool: the taken action has a Q (it lies in its state's set; False on padding)."""
        return self.action_slot_BT >= 0


class CausalLMPolicy(nn.Module):
    """Wraps a transformers causal LM as a token policy / Q-network.

    Args:
        model: an ``AutoModelForCausalLM`` (Llama, GPT-2, Qwen2, ...).
        vocab_size: the shared tokenizer's size; logits beyond it (padding rows of the embedding) are dropped.
    """

    def __init__(self, model: nn.Module, vocab_size: int | None = None):
        super().__init__()
        self.model = model
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"{type(model).__name__} has no output embedding (lm_head); tokenrl needs a causal LM")
        cfg = model.config
        for unsupported in ("final_logit_softcapping", "logit_scale"):
            if getattr(cfg, unsupported, None):
                raise ValueError(
                    f"{type(model).__name__} uses config.{unsupported}; the sparse head assumes logits = h @ W^T + b"
                )
        self.vocab_size = int(vocab_size or head.weight.shape[0])
        if self.vocab_size > head.weight.shape[0]:
            raise ValueError(f"vocab_size={self.vocab_size} exceeds the model's {head.weight.shape[0]} output rows")

    @property
    def head(self) -> nn.Module:
        """The output projection ``lm_head``."""
        return self.model.get_output_embeddings()

    def state_hidden(self, batch: Batch) -> torch.Tensor:
        """Final hidden states at the batch's ``S = T + 1`` states: ``[B, S, D]``."""
        out = self.model.base_model(
            input_ids=batch.input_ids_BL,
            attention_mask=batch.attention_mask_BL,
            position_ids=batch.position_ids_BL,
            use_cache=False,
        )
        h_BLD = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        P = batch.prompt_width
        return h_BLD[:, P - 1 :]

    def dense_logits(self, h_BSD: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits ``[B, S, V]`` from hidden states."""
        return self.head(h_BSD)[..., : self.vocab_size]

    def sparse_logits(self, h_BSD: torch.Tensor, ids_BSK: torch.Tensor) -> torch.Tensor:
        """Logits of the candidate ids only, ``[B, S, K]`` = ``h . W[ids] + b[ids]``.

        The gathered rows ``W[ids]`` are ``[B, S, K, D]`` (K: the batch's largest candidate set); when that
        is larger than the dense logits ``[B, S, V]`` and more than :data:`SPARSE_GATHER_ELEMENTS`, the dense
        logits are computed and gathered instead (equal to float rounding; on SmolLM2, K ~ 1000 and D = 576
        made the gathered rows and their gradient ~0.9 GB each for a batch of 8).
        """
        w_VD = self.head.weight
        if ids_BSK.numel() * w_VD.shape[1] > max(SPARSE_GATHER_ELEMENTS, ids_BSK[..., 0].numel() * w_VD.shape[0]):
            return self.head(h_BSD.to(w_VD.dtype)).gather(-1, ids_BSK)
        w_BSKD = w_VD[ids_BSK]
        logits = torch.einsum("bsd,bskd->bsk", h_BSD.to(w_VD.dtype), w_BSKD)
        bias = getattr(self.head, "bias", None)
        if bias is not None:
            logits = logits + bias[ids_BSK]
        return logits

    def forward(self, batch: Batch) -> torch.Tensor:
        """Dense logits at the batch's states, ``[B, S, V]``."""
        return self.dense_logits(self.state_hidden(batch))

    def token_nll(self, h_BTD: torch.Tensor, actions_BT: torch.Tensor, chunk_tokens: int = 1024) -> torch.Tensor:
        """Full-vocabulary ``-log softmax(logits)[action]`` per position, ``[B, T]``, with flat memory.

        Positions are processed in chunks under activation checkpointing, so at most one
        ``[chunk_tokens, V]`` block of logits is alive in the forward or the backward pass (instead of
        ``[B, T, V]``: 1.2 GB at B*T = 2048 and V = 150k in float32). Results equal the dense computation.
        """
        B, T, D = h_BTD.shape
        h_ND, a_N = h_BTD.reshape(-1, D), actions_BT.reshape(-1)
        chunks = []
        for start in range(0, h_ND.shape[0], chunk_tokens):
            args = (h_ND[start : start + chunk_tokens], a_N[start : start + chunk_tokens])
            if torch.is_grad_enabled() and h_ND.requires_grad:
                chunks.append(checkpoint(self._nll_block, *args, use_reentrant=False))
            else:
                chunks.append(self._nll_block(*args))
        return torch.cat(chunks).view(B, T) if chunks else h_BTD.new_zeros(B, T)

    def _nll_block(self, h_ND: torch.Tensor, a_N: torch.Tensor) -> torch.Tensor:
        return token_nll(upcast(self.dense_logits(h_ND)), a_N)

    def vocab_max(self, h_BSD: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Max logit over the vocabulary, ``[B, S]``, without keeping a ``[B, S, V]`` tensor for backward.

        The argmax is found without gradient in vocabulary chunks; the max is then recomputed from the argmax
        row of the output embedding, so its gradient is exact (the max's gradient only reaches that row).
        """
        with torch.no_grad():
            w_VD = self.head.weight[: self.vocab_size]
            bias = getattr(self.head, "bias", None)
            best_val = torch.full(h_BSD.shape[:-1], float("-inf"), device=h_BSD.device, dtype=w_VD.dtype)
            best_idx = torch.zeros(h_BSD.shape[:-1], dtype=torch.long, device=h_BSD.device)
            h = h_BSD.detach().to(w_VD.dtype)
            for start in range(0, w_VD.shape[0], chunk):
                logits = h @ w_VD[start : start + chunk].T
                if bias is not None:
                    logits = logits + bias[start : start + chunk]
                val, idx = logits.max(-1)
                better = val > best_val
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx + start, best_idx)
        return self.sparse_logits(h_BSD, best_idx[..., None])[..., 0]

    def candidate_q(
        self,
        batch: Batch,
        top_p: float,
        sparse: bool = True,
        h_BSD: torch.Tensor | None = None,
        with_vocab_max: bool = False,
    ) -> CandidateQ:
        """Student logits on each state's action set of the top-p MDP.

        ``top_p = 1`` means no restriction: the set is the whole vocabulary (dense). Otherwise the set is the
        batch's cached teacher top-p set, read either by gathering rows of the output embedding (``sparse``)
        or from dense logits (the reference path).
        """
        h = self.state_hidden(batch) if h_BSD is None else h_BSD
        if top_p >= 1.0:
            logits = self.dense_logits(h)
            mask = batch.state_mask_BS[:, :, None].expand_as(logits)
            idx = torch.where(batch.action_mask_BT, batch.actions_BT, torch.full_like(batch.actions_BT, -1))
            return CandidateQ(logits, mask, idx, logits.amax(-1) if with_vocab_max else None)
        if abs(batch.top_p - top_p) > 1e-12:
            raise ValueError(f"batch sets were restricted to p={batch.top_p}, but the loss asks for p={top_p}")
        vmax = None
        if sparse:
            logits = self.sparse_logits(h, batch.cand_ids_BSK)
            if with_vocab_max:  # an O(|V|) pass without gradient: only when the Q shift needs it
                vmax = self.vocab_max(h)
        else:
            dense = self.dense_logits(h)
            logits = dense.gather(-1, batch.cand_ids_BSK)
            vmax = dense.amax(-1) if with_vocab_max else None
        return CandidateQ(logits, batch.cand_mask_BSK, batch.action_slot_BT, vmax)

