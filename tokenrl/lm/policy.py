"""Student-side heads: Q-values of a transformers causal LM at the states of a :class:`~tokenrl.data.buffer.Batch`.

The student's logits are its Q-function. The network itself (any ``AutoModelForCausalLM``) knows nothing
about training; this module turns a batch into per-state hidden states and then into either dense logits
``[B, S, V]`` or *sparse* logits on candidate ids ``[B, S, K]`` computed as ``h @ W[ids]^T``, which costs
O(K) per state instead of O(|V|). Both paths give the same numbers and gradients (tested). With
``precision="bf16"`` the body and the head run under bfloat16 autocast (:mod:`tokenrl.lm.precision`). An
optional scalar value head on the same hidden states (:meth:`CausalLMPolicy.add_value_head`) serves algorithms
that learn a state value next to the logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenrl.core.distributions import soft_value, upcast
from tokenrl.data.buffer import ActionSlots, Batch
from tokenrl.lm.precision import PRECISIONS, autocast, compiled_body


SPARSE_GATHER_ELEMENTS = 1 << 24
"""Largest gathered head ``[B, S, K, D]`` (elements) :meth:`CausalLMPolicy.sparse_logits` builds before it
switches to dense logits gathered at the candidates (when those are smaller)."""


@dataclass
class CandidateQ(ActionSlots):
    """Student logits on each state's candidate set.

    Attributes:
        logits_BSK: ``[B, S, K]`` student logits of the candidates (K = V for the dense form).
        mask_BSK: ``[B, S, K]`` bool candidate validity (states past the response end are all False).
        action_slot_BT: ``[B, T]`` slot of the taken action among the candidates, -1 if outside the set or on
            padding (for the dense form the slot is the token id itself).
    """

    logits_BSK: torch.Tensor
    mask_BSK: torch.Tensor
    action_slot_BT: torch.Tensor


@dataclass(frozen=True)
class VocabStats:
    """Per-position statistics of the student's full-vocabulary logits (see :meth:`CausalLMPolicy.vocab_stats`).

    Attributes:
        max_BS: ``[B, S]`` max logit over the vocabulary, or None.
        lse_BS: ``[B, S]`` log-normaliser (log-sum-exp) of the logits over the vocabulary, or None.
        nll_BT: ``[B, T]`` ``-log softmax(logits)[action]`` of the given actions, or None.
    """

    max_BS: torch.Tensor | None = None
    lse_BS: torch.Tensor | None = None
    nll_BT: torch.Tensor | None = None


class CausalLMPolicy(nn.Module):
    """Wraps a transformers causal LM as a token policy / Q-network.

    Args:
        model: an ``AutoModelForCausalLM`` (Llama, GPT-2, Qwen2, ...).
        vocab_size: the shared tokenizer's size; logits beyond it (padding rows of the embedding) are dropped.
        precision: ``fp32`` or ``bf16`` (:mod:`tokenrl.lm.precision`): the autocast of the body and the head.
            Their outputs are then bfloat16; every loss upcasts them (:func:`tokenrl.core.backup.upcast`).
        compile: run the decoder body through ``torch.compile`` (:func:`tokenrl.lm.precision.compiled_body`);
            True for the inductor backend, or a backend name.
    """

    def __init__(
        self, model: nn.Module, vocab_size: int | None = None, precision: str = "fp32", compile: bool | str = False
    ):
        super().__init__()
        self.model = model
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: must be one of {sorted(PRECISIONS)}")
        self.precision = precision
        # A function, not a module attribute, so the policy's state_dict keys stay the model's.
        self._compiled_body = None
        if compile:
            self._compiled_body = compiled_body(model.base_model, *([] if compile is True else [compile]))
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
        self.value_head: nn.Linear | None = None  # see add_value_head

    @property
    def head(self) -> nn.Module:
        """The output projection ``lm_head``."""
        return self.model.get_output_embeddings()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.head.weight.device.type)

    def state_hidden(self, batch: Batch) -> torch.Tensor:
        """Final hidden states at the batch's ``S = T + 1`` states: ``[B, S, D]``."""
        with self._autocast():
            out = (self._compiled_body or self.model.base_model)(
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
        with self._autocast():
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
            return self.dense_logits(h_BSD.to(w_VD.dtype)).gather(-1, ids_BSK)
        with self._autocast():
            w_BSKD = w_VD[ids_BSK]
            logits = torch.einsum("bsd,bskd->bsk", h_BSD.to(w_VD.dtype), w_BSKD)
            bias = getattr(self.head, "bias", None)
            if bias is not None:
                logits = logits + bias[ids_BSK]
            return logits

    def add_value_head(self) -> nn.Linear:
        """Attach (once) a scalar state-value head ``V(s) = w . h(s) + b`` on the final hidden state, zero at the start.

        The head belongs to this policy, not to ``model``: it trains, is clipped and is saved with the policy's
        parameters and ``state_dict``, while the network that samples and is saved as the student stays the plain LM.
        """
        if self.value_head is None:
            w_VD = self.head.weight
            self.value_head = nn.Linear(w_VD.shape[1], 1, device=w_VD.device, dtype=w_VD.dtype)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        return self.value_head

    def value(self, h_BSD: torch.Tensor) -> torch.Tensor:
        """The value head at the given states, ``[B, S]`` (at least float32); needs :meth:`add_value_head`."""
        if self.value_head is None:
            raise ValueError("this policy has no value head; call add_value_head() first")
        return upcast(self.value_head(h_BSD.to(self.value_head.weight.dtype))[..., 0])

    def forward(self, batch: Batch) -> torch.Tensor:
        """Dense logits at the batch's states, ``[B, S, V]``."""
        return self.dense_logits(self.state_hidden(batch))

    def vocab_stats(
        self,
        h_BSD: torch.Tensor,
        actions_BT: torch.Tensor | None = None,
        need_max: bool = False,
        need_lse: bool = False,
        chunk_tokens: int = 1024,
    ) -> VocabStats:
        """Everything a loss needs from the full vocabulary, in ONE chunked pass with flat memory.

        Positions are processed in chunks under activation checkpointing, so at most one
        ``[chunk_tokens, V]`` block of logits is alive in the forward or the backward pass (instead of
        ``[B, S, V]``: 1.2 GB at B*S = 2048 and V = 150k in float32). Values and gradients equal the dense
        computation (the max's gradient goes to the argmax entry, split evenly between exact ties).

        Args:
            h_BSD: ``[B, S, D]`` hidden states.
            actions_BT: ``[B, T]`` long token ids (``T <= S``) whose NLL is wanted at the first T positions,
                or None for no NLL.
            need_max: compute the max logit over the vocabulary (Bellman Distill's paper Q shift).
            need_lse: compute the log-normaliser (log-sum-exp) over the vocabulary.
            chunk_tokens: positions per chunk.

        Returns:
            A :class:`VocabStats` with the requested fields set (float32 or wider) and the rest None.
        """
        B, S, D = h_BSD.shape
        need_nll = actions_BT is not None
        if not (need_max or need_lse or need_nll):
            return VocabStats()
        T = actions_BT.shape[1] if need_nll else 0
        a_BS = torch.zeros(B, S, dtype=torch.long, device=h_BSD.device)
        if need_nll:
            a_BS[:, :T] = actions_BT
        h_ND, a_N = h_BSD.reshape(-1, D), a_BS.reshape(-1)
        chunks = []
        for start in range(0, h_ND.shape[0], chunk_tokens):
            args = (h_ND[start : start + chunk_tokens], a_N[start : start + chunk_tokens])
            if torch.is_grad_enabled() and h_ND.requires_grad:
                chunks.append(checkpoint(self._stats_block, *args, use_reentrant=False))
            else:
                chunks.append(self._stats_block(*args))
        max_BS, lse_BS, picked_BS = (torch.cat(c).view(B, S) for c in zip(*chunks))
        return VocabStats(
            max_BS=max_BS if need_max else None,
            lse_BS=lse_BS if need_lse else None,
            # token_nll's -log softmax(logits)[a] with the chunks' log-normaliser, which is computed anyway
            nll_BT=(lse_BS - picked_BS)[:, :T] if need_nll else None,
        )

    def _stats_block(self, h_ND: torch.Tensor, a_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_NV = upcast(self.dense_logits(h_ND))
        return logits_NV.amax(-1), soft_value(logits_NV), logits_NV.gather(-1, a_N[:, None])[:, 0]

    def action_nll(self, h_BTD: torch.Tensor, actions_BT: torch.Tensor, chunk_tokens: int = 1024) -> torch.Tensor:
        """Full-vocabulary NLL of the batch's actions, ``[B, T]``, from hidden states with flat memory: the chunked
        form of :func:`tokenrl.core.distributions.token_nll` (see :meth:`vocab_stats`)."""
        return self.vocab_stats(h_BTD, actions_BT, chunk_tokens=chunk_tokens).nll_BT

    def candidate_q(
        self,
        batch: Batch,
        top_p: float,
        sparse: bool = True,
        h_BSD: torch.Tensor | None = None,
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
            return CandidateQ(logits, mask, idx)
        if abs(batch.top_p - top_p) > 1e-12:
            raise ValueError(f"batch sets were restricted to p={batch.top_p}, but the loss asks for p={top_p}")
        if sparse:
            logits = self.sparse_logits(h, batch.cand_ids_BSK)
        else:
            logits = self.dense_logits(h).gather(-1, batch.cand_ids_BSK)
        return CandidateQ(logits, batch.cand_mask_BSK, batch.action_slot_BT)

