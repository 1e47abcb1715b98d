"""An exact synthetic teacher: a stochastic "language" whose next-token distribution is known in closed form.

The language is a deterministic finite-state machine with sparse emissions. The state after a prefix is
``(topic, q)``: the topic is fixed by the first token of the sequence and never changes (a long-range
dependency a student must carry through the whole sequence), and ``q`` moves by a random transition table
``delta[topic, q, token]``. Each state emits from a sparse Dirichlet distribution over a few tokens,
smoothed by a little uniform mass so that every sequence has finite log-likelihood (like a real LM, the
tail is long but thin). Some local states put mass on EOS, which ends the response.

Because the state is a function of the prefix, the teacher's log-likelihood of any sequence, its entropy
rate and every top-p set are exact. This is the embedded default task: fast on CPU and with exact metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from tokenrl.core.distributions import project_to_set
from tokenrl.core.options import AT_LEAST_ONE, NON_NEGATIVE, OPEN_UNIT, POSITIVE, UNIT_INTERVAL, field_problems
from tokenrl.core.teachers import TokenPositions


@dataclass
class SyntheticLanguageConfig:
    """Parameters of :class:`SyntheticLanguage`.

    Attributes:
        vocab_size: number of tokens including EOS (id ``eos_token_id``).
        n_topics: number of topics; the first token of a sequence selects one.
        n_local_states: local FSM states per topic.
        mean_support: mean number of tokens carrying a state's sparse mass (1 + Poisson(mean_support - 1)),
            or the median of a log-normal with ``support_log_std > 0``.
        max_support: cap on that number (at most ``vocab_size - 1``).
        concentration: Dirichlet concentration of the sparse weights (small = peaked), or the median of the
            per-state concentrations with ``concentration_log_std > 0``.
        support_log_std: > 0 draws each state's support size from a log-normal (median ``mean_support``, this
            log-std) instead of the Poisson: a heavy tail of wide states, as in a real LM.
        concentration_log_std: > 0 draws each state's Dirichlet concentration from a log-normal (median
            ``concentration``, this log-std): some states near-deterministic, some near-uniform on their support.
            With both log-stds at 0 (the default) the language is the one drawn before these options existed.
        transitions: ``fsm``: the local state moves by a random table ``delta[topic, q, token]`` (it depends on
            the whole history); ``last_token``: the local state is a fixed random class of the last token
            (``class_topic[token]``), so topic and last token determine the next-token distribution, as in
            an n-gram model: a student learns it with far less capacity than an FSM tracker.
        smoothing: total probability mass spread uniformly over the whole vocabulary in every state.
        eos_states: fraction of local states that can end the response.
        eos_prob: probability of EOS in those states.
        prompt_len_min: shortest prompt (tokens).
        prompt_len_max: longest prompt (tokens).
        seed: seed of the random tables.
    """

    vocab_size: int = 64
    n_topics: int = 8
    n_local_states: int = 16
    mean_support: float = 3.0
    max_support: int = 8
    concentration: float = 0.5
    support_log_std: float = 0.0
    concentration_log_std: float = 0.0
    transitions: str = "fsm"
    smoothing: float = 0.02
    eos_states: float = 0.25
    eos_prob: float = 0.25
    prompt_len_min: int = 4
    prompt_len_max: int = 8
    seed: int = 0

    def problems(self, prefix: str = "language") -> list[str]:
        """Every field out of its range or choices and every broken cross-field rule, one line each."""
        ranges = {
            "vocab_size": POSITIVE, "n_topics": POSITIVE, "n_local_states": POSITIVE, "mean_support": AT_LEAST_ONE,
            "max_support": AT_LEAST_ONE, "concentration": POSITIVE, "support_log_std": NON_NEGATIVE.explained("0 = off"),
            "concentration_log_std": NON_NEGATIVE.explained("0 = off"),
            "smoothing": OPEN_UNIT.explained("so that every sequence has a finite likelihood"),
            "eos_states": UNIT_INTERVAL, "eos_prob": UNIT_INTERVAL, "prompt_len_min": AT_LEAST_ONE,
            "prompt_len_max": AT_LEAST_ONE, "seed": NON_NEGATIVE,
        }
        found = field_problems(self, prefix, ranges, choices={"transitions": ("fsm", "last_token")})
        if self.vocab_size < self.n_topics + 2:
            found.append(
                f"{prefix}.vocab_size={self.vocab_size} is too small for {prefix}.n_topics={self.n_topics}: needs at "
                "least n_topics + 2 (EOS and one more token)"
            )
        elif self.max_support > self.vocab_size - 1:
            found.append(f"{prefix}.max_support={self.max_support}: must be <= vocab_size - 1 = {self.vocab_size - 1}")
        if self.prompt_len_max < self.prompt_len_min:
            found.append(
                f"{prefix}.prompt_len_max={self.prompt_len_max} < {prefix}.prompt_len_min={self.prompt_len_min}; "
                "raise the maximum or lower the minimum"
            )
        return found


class SyntheticLanguage:
    """Exact synthetic teacher and data source (implements :class:`tokenrl.core.teachers.Teacher`).

    Args:
        config: the language's parameters.

    Attributes:
        log_emission_SV: ``[S, V]`` float64 log next-token probabilities of every FSM state; state
            ``S - 1`` is the start state (empty prefix).
        next_state_SV: ``[S, V]`` long, the state after emitting a token.
    """

    eos_token_id: int = 0

    def __init__(self, config: SyntheticLanguageConfig | None = None):
        cfg = config or SyntheticLanguageConfig()
        problems = cfg.problems()
        if problems:
            raise ValueError("invalid SyntheticLanguageConfig:\n  " + "\n  ".join(problems))
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        rng = np.random.default_rng(cfg.seed)
        V, Z, Q = cfg.vocab_size, cfg.n_topics, cfg.n_local_states
        n_states = Z * Q + 1
        self.start_state = n_states - 1
        probs = np.zeros((n_states, V))
        eos_q = rng.random(Q) < cfg.eos_states
        eos_q[0] = False  # a response never ends right after the topic token
        for z in range(Z):
            for q in range(Q):
                # The draws of the default options come first and alone, so that language stays bit-identical.
                if cfg.support_log_std > 0:
                    k = int(np.clip(np.rint(cfg.mean_support * np.exp(rng.normal(0.0, cfg.support_log_std))), 1, cfg.max_support))
                else:
                    k = int(min(cfg.max_support, 1 + rng.poisson(max(cfg.mean_support - 1.0, 0.0))))
                support = rng.choice(np.arange(1, V), size=k, replace=False)
                concentration = cfg.concentration
                if cfg.concentration_log_std > 0:
                    concentration *= float(np.exp(rng.normal(0.0, cfg.concentration_log_std)))
                row = np.zeros(V)
                row[support] = rng.dirichlet(np.full(k, concentration))
                if eos_q[q]:
                    row *= 1.0 - cfg.eos_prob
                    row[self.eos_token_id] += cfg.eos_prob
                probs[z * Q + q] = (1.0 - cfg.smoothing) * row + cfg.smoothing / V
        # Start state: the first token picks the topic (tokens 1..Z, uniformly), plus smoothing.
        start = np.zeros(V)
        start[1 : Z + 1] = 1.0 / Z
        probs[self.start_state] = (1.0 - cfg.smoothing) * start + cfg.smoothing / V
        probs /= probs.sum(1, keepdims=True)
        next_state = np.empty((n_states, V), dtype=np.int64)
        for z in range(Z):
            if cfg.transitions == "last_token":
                next_state[z * Q : (z + 1) * Q] = z * Q + rng.integers(0, Q, size=V)
                continue
            for q in range(Q):
                next_state[z * Q + q] = z * Q + rng.integers(0, Q, size=V)
        topic_of_first = (np.arange(V) - 1) % Z
        next_state[self.start_state] = topic_of_first * Q  # local state 0 of the chosen topic
        self.probs_SV = probs
        self.log_emission_SV = np.log(probs)
        self.next_state_SV = next_state
        self._log_emission_t = torch.from_numpy(self.log_emission_SV)
        self._next_state_t = torch.from_numpy(next_state)

    @property
    def n_states(self) -> int:
        """Number of FSM states including the start state."""
        return self.probs_SV.shape[0]

    # ----------------------------------------------------------------------------------------------
    # Exact state tracking
    # ----------------------------------------------------------------------------------------------
    def states(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """FSM state after each prefix: ``[B, T]`` long, entry ``t`` = state after ``tokens[:, : t + 1]``."""
        tokens = torch.as_tensor(tokens_BT, dtype=torch.long).cpu()
        if tokens.dim() != 2:
            raise ValueError(f"tokens_BT must be 2-D [batch, time], got shape {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got range [{tokens.min()}, {tokens.max()}]")
        B, T = tokens.shape
        out = torch.empty(B, T, dtype=torch.long)
        s = torch.full((B,), self.start_state, dtype=torch.long)
        for t in range(T):
            s = self._next_state_t[s, tokens[:, t]]
            out[:, t] = s
        return out

    def prefix_states(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """State after the first ``lengths_B[b]`` tokens of each row: ``[B]`` long (start state if length 0)."""
        lengths = torch.as_tensor(lengths_B, dtype=torch.long).cpu()
        if tokens_BT.shape[1] == 0:
            return torch.full((tokens_BT.shape[0],), self.start_state, dtype=torch.long)
        st = self.states(tokens_BT)
        idx = (lengths - 1).clamp(min=0)
        s = st.gather(1, idx[:, None])[:, 0]
        return torch.where(lengths > 0, s, torch.full_like(s, self.start_state))

    # ----------------------------------------------------------------------------------------------
    # Teacher interface
    # ----------------------------------------------------------------------------------------------
    def next_token_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        """Exact next-token log-probabilities ``[B, V]`` (float32) after each prefix."""
        s = self.prefix_states(tokens_BT, lengths_B)
        return self._log_emission_t[s].float().to(tokens_BT.device)

    def sequence_logits(self, tokens_BT: torch.Tensor, lengths_B: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced log-probabilities ``[B, T, V]`` (float32)."""
        return self._log_emission_t[self.states(tokens_BT)].float().to(tokens_BT.device)

    def position_logits(self, at: TokenPositions, chunk: int) -> Iterator[torch.Tensor]:
        """Exact log-probabilities ``[n, V]`` (float32) at the positions of ``at``, ``chunk`` at a time."""
        states_N = self.states(at.tokens_BT)[at.rows_N.cpu(), at.cols_N.cpu()]
        for start in range(0, len(states_N), chunk):
            yield self._log_emission_t[states_N[start : start + chunk]].float().to(at.tokens_BT.device)

    def entropy_per_state(self) -> np.ndarray:
        """Entropy (nats) of the next-token distribution of every state, ``[S]``."""
        return -(self.probs_SV * self.log_emission_SV).sum(1)

    # ----------------------------------------------------------------------------------------------
    # Sampling prompts and continuations
    # ----------------------------------------------------------------------------------------------
    def sample_prompts(self, n: int, rng: np.random.Generator, length: int | None = None) -> list[list[int]]:
        """Sample ``n`` prompts (token lists, never containing EOS) from the language.

        Each prompt's length is drawn from ``[prompt_len_min, prompt_len_max]``, or is ``length`` when given.
        """
        cfg = self.config
        prompts = []
        for _ in range(n):
            n_tokens = length if length is not None else int(rng.integers(cfg.prompt_len_min, cfg.prompt_len_max + 1))
            s = self.start_state
            toks = []
            for _ in range(n_tokens):
                pr = self.probs_SV[s].copy()
                pr[self.eos_token_id] = 0.0
                tok = int(rng.choice(self.vocab_size, p=pr / pr.sum()))
                toks.append(tok)
                s = int(self.next_state_SV[s, tok])
            prompts.append(toks)
        return prompts

    def sample_continuations(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        rng: np.random.Generator,
        top_p: float = 1.0,
        temperature: float = 1.0,
    ) -> list[tuple[list[int], bool]]:
        """Sample a response for each prompt; returns ``(tokens, terminated)`` pairs.

        ``terminated`` is True when the response ended with EOS (EOS is the last token), False when it was
        cut at ``max_new_tokens``. ``top_p`` < 1 samples from the teacher's projection onto its top-p set.
        """
        from tokenrl.core.top_p import check_p, top_p_mask

        check_p(top_p)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        logits_all = self._log_emission_t.float() / temperature
        sample_probs = project_to_set(logits_all.double(), top_p_mask(logits_all, top_p), log=False).numpy()
        cum = np.cumsum(sample_probs, axis=1)
        out = []
        for prompt in prompts:
            s = self.start_state
            for tok in prompt:
                s = int(self.next_state_SV[s, tok])
            resp: list[int] = []
            terminated = False
            for _ in range(max_new_tokens):
                tok = int(min(np.searchsorted(cum[s], rng.random(), side="right"), self.vocab_size - 1))
                resp.append(tok)
                if tok == self.eos_token_id:
                    terminated = True
                    break
                s = int(self.next_state_SV[s, tok])
            out.append((resp, terminated))
        return out

    def token_to_text(self, tokens: list[int]) -> str:
        """Render tokens as words (``t17``; EOS dropped) for Rouge-L."""
        return " ".join(f"t{t}" for t in tokens if t != self.eos_token_id)
