"""Client-level DP (DP-FedAvg) for a `LoRAStrategy`: the clip bound sent with each train message,
the private aggregate in place of the rule's, the federation's accountant, and Fed-SB's gradient
estimates privatised and counted as one more release.

Why not Flower's DP wrappers. `DifferentialPrivacyClientSideFixedClipping` adds its noise to the
ArrayRecord that ``aggregate_train`` returns, but a LoRAStrategy builds every payload from its
rule's own state, sliced to each node's ranks, not from that record: the noise has to enter the
state. Its noise comes from NumPy's unseeded global generator, and its accountant admits neither
sampling amplification nor a strategy other than Flower's own FedAvg. `fixedclipping_mod` clips the
difference between the reply's one ArrayRecord and the message's, key by key: our messages carry
several records (adapter, head, probes), Fed-SB's first payload holds fixed factors the reply
lacks, and it would clip the unfolded factors, whose change understates by sqrt(s_i) what the
server adds. `DifferentialPrivacyServerSideFixedClipping` clips each reply against the global
arrays, which have the top rank's shapes, so it breaks with mixed ranks. Here each client clips its
update in its own shapes (`fedlora.privacy.client_level.clip_reply`), the server clips again (so the bound
holds for a client that did not) and noises the state (`fedlora.privacy.client_level.private_round`).

Training and evaluation metrics (loss, accuracy, example counts, update norms) are not privatised,
as in Flower's wrappers; the probes that measure exactness are not asked for under DP, since a
FedSA-LoRA client's would reveal its personal B.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from logging import INFO

import torch
from flwr.app import Message
from flwr.supercore import log
from torch import Tensor

from fedlora.lora.updates import ClientUpdate
from fedlora.privacy.accounting import FederationAccountant
from fedlora.privacy.client_level import UPDATE_NORM_KEY, private_mean, private_round
from fedlora.rules import AggregationRule, GlobalState, RoundResult
from fedlora.wire.messages import METRICS_RECORD

EPSILON_METRIC = "client_dp_epsilon"
CLIPPED_METRIC = "client_dp_clipped"
NORM_METRIC = "client_dp_update_norm_max"


class ClientLevelDP:
    """DP-FedAvg's server side: clip bound, Gaussian noise on the state, the accountant.

    Parameters
    ----------
    clip : float
        C, the L2 bound on one client's whole update in its own shapes (> 0).
    noise_multiplier : float
        sigma: the noise on each aggregated coordinate has std sigma C / n (>= 0).
    delta : float (default: 1e-5)
        The delta epsilon is reported at.
    accountant : str (default: "rdp")
        Opacus accountant of the federation: ``rdp`` or ``prv``.
    noise_seed : int, optional
        None (default): the noise comes from a secret seed. An int makes it reproducible from
        (noise_seed, round), for tests: whoever knows it can subtract the noise.
    init_clip : float (default: 1.0)
        Bound on one client's Fed-SB gradient estimate (all its sketches or gradients together).

    Attributes
    ----------
    accountant : FederationAccountant
        Stepped once per private release.
    """

    def __init__(
        self,
        clip: float,
        noise_multiplier: float,
        *,
        delta: float = 1e-5,
        accountant: str = "rdp",
        noise_seed: int | None = None,
        init_clip: float = 1.0,
    ) -> None:
        if not clip > 0 or not init_clip > 0:
            raise ValueError(f"clip bounds must be > 0, got {clip} and {init_clip}")
        if not noise_multiplier >= 0:
            raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.clip, self.noise_multiplier, self.delta = clip, noise_multiplier, delta
        self.init_clip = init_clip
        self.noise_seed = noise_seed
        self.accountant = FederationAccountant(accountant)
        self._secret_seed = secrets.randbits(62)
        self._sampled: dict[int, tuple[int, int]] = {}

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> Client-level DP: clip %s | noise multiplier %s | %s accountant, delta %g",
            self.clip,
            self.noise_multiplier,
            self.accountant.mechanism,
            self.delta,
        )

    def sampled(self, server_round: int, num_sampled: int, num_nodes: int) -> None:
        """Record the round's n (messages sent) and N (nodes connected): q = n / N."""
        self._sampled[server_round] = (num_sampled, num_nodes)

    def generator(self, server_round: int) -> torch.Generator:
        seed = self._secret_seed if self.noise_seed is None else self.noise_seed
        return torch.Generator().manual_seed((seed * 1_000_003 + server_round) % 2**63)

    def aggregate(
        self,
        rule: AggregationRule,
        state: GlobalState,
        updates: Sequence[ClientUpdate],
        replies: Sequence[Message],
        server_round: int,
    ) -> tuple[RoundResult, dict[str, float]]:
        """The private round (`fedlora.privacy.client_level.private_round`), the accountant stepped, and the
        metrics: epsilon so far, the largest update norm the server measured (at most C, up to
        rounding, when clients clip) and the fraction of clients that had to clip."""
        num_sampled, num_nodes = self._sampled.pop(server_round)
        private = private_round(
            rule,
            state,
            updates,
            num_sampled,
            self.clip,
            self.noise_multiplier,
            self.generator(server_round),
        )
        self.accountant.step(self.noise_multiplier, num_sampled / num_nodes)
        reported = [
            float(m.content[METRICS_RECORD][UPDATE_NORM_KEY])
            for m in replies
            if UPDATE_NORM_KEY in m.content[METRICS_RECORD]
        ]
        metrics = {
            EPSILON_METRIC: self.epsilon(),
            NORM_METRIC: max(private.update_norms),
            CLIPPED_METRIC: sum(norm > self.clip for norm in reported) / max(len(reported), 1),
        }
        return private.result, metrics

    def private_estimate(
        self, estimates: Sequence[Mapping[str, Tensor]], num_sampled: int, num_nodes: int
    ) -> dict[str, Tensor]:
        """Fed-SB's gradient estimates as one private mean: clipped to ``init_clip``, weighted 1/n
        (n = the nodes asked), noised with std sigma init_clip / n; one release (round 0)."""
        padded = list(estimates) + [
            {key: torch.zeros_like(t) for key, t in estimates[0].items()}
        ] * (num_sampled - len(estimates))
        mean, _ = private_mean(padded, self.init_clip, self.noise_multiplier, self.generator(0))
        self.accountant.step(self.noise_multiplier, num_sampled / num_nodes)
        log(INFO, "Fed-SB initialisation: %s = %.4f", EPSILON_METRIC, self.epsilon())
        return mean

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta)

    def state_dict(self) -> dict:
        """The accountant's history and the noise's secret seed (a resumed run draws the noise
        the uninterrupted one would; the checkpoint must stay as private as the server)."""
        return {"accountant": self.accountant.state_dict(), "secret_seed": self._secret_seed}

    def load_state_dict(self, state: Mapping) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self._secret_seed = int(state["secret_seed"])
