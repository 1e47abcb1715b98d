"""A token MDP small enough to enumerate every response, with a tabular student (test helper).

Built on :func:`envs.toy_mdps.random_token_mdp`: the teacher's next-token distribution at each live prefix
is that MDP's ``teacher_SA``; the student is a ``[n_live, V]`` table of logits (a torch parameter), one
row per live prefix.
"""

from __future__ import annotations

import numpy as np
import torch

from envs.toy_mdps import random_token_mdp, token_prefixes


class TinyTokenMDP:
    """Live prefixes, the teacher's log-probs on them, enumeration and batched sampling of responses.

    Args:
        vocab_size: tokens including EOS (id 0).
        max_len: responses truncate after this many tokens.
        seed: seed of the random teacher.
        concentration: Dirichlet concentration of the teacher rows.
    """

    def __init__(self, vocab_size: int = 3, max_len: int = 3, seed: int = 0, concentration: float = 0.7):
        mdp = random_token_mdp(vocab_size, max_len, np.random.default_rng(seed), concentration=concentration)
        prefixes = token_prefixes(vocab_size, max_len)
        live = [i for i, prefix in enumerate(prefixes) if len(prefix) < max_len]
        self.prefixes = [prefixes[i] for i in live]
        row = {prefix: r for r, prefix in enumerate(self.prefixes)}
        self.vocab_size, self.max_len = vocab_size, max_len
        self.teacher_logp_SV = torch.log(torch.tensor(mdp.teacher_SA[live], dtype=torch.float64))
        # next_row_SV[s, a]: row of prefix + (a,), or -1 when the episode ends (EOS, or max_len reached).
        self.next_row_SV = torch.full((len(live), vocab_size), -1, dtype=torch.long)
        for r, prefix in enumerate(self.prefixes):
            for a in range(1, vocab_size):
                self.next_row_SV[r, a] = row.get(prefix + (a,), -1)

    @property
    def n_live(self) -> int:
        """Number of live prefixes (rows of the tables)."""
        return len(self.prefixes)

    def responses(self) -> list[list[tuple[int, int]]]:
        """Every complete response as ``[(row, action), ...]``."""
        out, stack = [], [(0, [])]
        while stack:
            r, path = stack.pop()
            for a in range(self.vocab_size):
                nxt = int(self.next_row_SV[r, a])
                if nxt < 0:
                    out.append(path + [(r, a)])
                else:
                    stack.append((nxt, path + [(r, a)]))
        return out

    def sample(self, logits_SV: torch.Tensor, n: int, generator: torch.Generator):
        """``n`` responses from ``softmax(logits_SV)``: ``(rows_BT, actions_BT, mask_BT)``, padding row 0."""
        probs_SV = torch.softmax(logits_SV.detach().double(), -1)
        rows_BT = torch.zeros(n, self.max_len, dtype=torch.long)
        actions_BT = torch.zeros(n, self.max_len, dtype=torch.long)
        mask_BT = torch.zeros(n, self.max_len, dtype=torch.bool)
        row_B, active_B = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool)
        for t in range(self.max_len):
            a_B = torch.multinomial(probs_SV[row_B], 1, generator=generator)[:, 0]
            rows_BT[:, t] = torch.where(active_B, row_B, 0)
            actions_BT[:, t] = torch.where(active_B, a_B, 0)
            mask_BT[:, t] = active_B
            nxt_B = self.next_row_SV[row_B, a_B]
            active_B = active_B & (nxt_B >= 0)
            row_B = torch.where(active_B, nxt_B, 0)
        return rows_BT, actions_BT, mask_BT

    def sequence_reverse_kl(self, logits_SV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact ``(KL(pi_s(y) || pi_t(y)), E_{y ~ pi_s}|y|)`` by enumeration (differentiable in the first)."""
        logp_SV = torch.log_softmax(logits_SV, -1)
        kl = logits_SV.new_zeros(())
        mean_len = logits_SV.new_zeros(())
        for path in self.responses():
            rows, acts = torch.tensor([r for r, _ in path]), torch.tensor([a for _, a in path])
            ls = logp_SV[rows, acts].sum()
            lt = self.teacher_logp_SV[rows, acts].sum()
            kl = kl + ls.exp() * (ls - lt)
            mean_len = mean_len + ls.exp().detach() * len(path)
        return kl, mean_len
