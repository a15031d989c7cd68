"""Fed-SB as a Flower strategy: R averaged between fixed factors set by a federated LoRA-SB start.

Before the first round, unless the initial arrays already carry non-zero fixed factors and R, the
strategy asks every sampled node (a ``query.sb_init`` message) for its estimate of the full-weight
gradient on its own data, and sets B, A and R_0 from their example-weighted combination
(`fedlora.lora.fedsb_init`): in ``sketch`` mode (default) nodes send the sketches G Omega and Psi G
(k d_out + l d_in floats per module) and the first step is SGD-like, -eta G; in ``sign`` mode they
send the dense G (d_out x d_in per module) and the first step is LoRA-SB's Adam-like -eta sign(G).
The upload is reported once, as ``setup_bytes_up`` of round 1. Under client-level DP the
estimates are one private release: clipped, averaged uniformly and noised
(`strategies.client_dp.ClientLevelDP.private_estimate`).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora import rules
from fedlora.config import RunConfig
from fedlora.lora.fedsb_init import (
    DEFAULT_ETA,
    DEFAULT_OVERSAMPLE,
    GradientSketch,
    SBInit,
    sign_init,
    sketch_init,
    sketch_sizes,
)
from fedlora.lora.lowrank import LowRank
from fedlora.rules import GlobalState
from fedlora.wire.messages import (
    CONFIG_RECORD,
    GRADIENT_SUFFIX,
    SB_A_SUFFIX,
    SB_B_SUFFIX,
    SB_INIT_ACTION,
    SB_INIT_MODE_KEY,
    SB_INIT_RANK_KEY,
    SB_INIT_SEED_KEY,
    SB_R_SUFFIX,
    SKETCH_Y_SUFFIX,
    SKETCH_Z_SUFFIX,
    modules_with_suffix,
)
from strategies.base import LoRAStrategy
from strategies.initial_arrays import sb_initial_arrays
from strategies.records import record_tensors, serialized_bytes
from strategies.reply_checks import RejectedReply

INIT_MODES = ("sketch", "sign")


class FedSB(LoRAStrategy):
    """Fed-SB: R = sum_i p_i R_i between fixed B and A (exact for any mix of capacities).

    Parameters
    ----------
    init_mode : str (default: "sketch")
        How nodes send their gradient estimates for the LoRA-SB start: ``sketch`` or ``sign``.
    eta : float (default: 1e-4)
        Step size of the approximated first step; LoRA-SB uses the run's learning rate.
    init_seed : int (default: 0)
        Seed of the sketches' test matrices and of the randomized SVD.
    **kwargs
        `LoRAStrategy`'s parameters.
    """

    rule_class = rules.FedSB

    @classmethod
    def options_from(cls, config: RunConfig) -> dict:
        """The rule's options; ``eta``: the run's learning rate, as LoRA-SB; ``init_seed``: the
        run's seed."""
        return {
            **super().options_from(config),
            "eta": config.learning_rate,
            "init_seed": config.seed,
        }

    @classmethod
    def initial_arrays(cls, config: RunConfig) -> ArrayRecord:
        """Zero placeholders of the fixed factors (the federated LoRA-SB start sets them)."""
        return sb_initial_arrays(config)

    def __init__(
        self,
        *,
        init_mode: str = "sketch",
        eta: float = DEFAULT_ETA,
        init_seed: int = 0,
        **kwargs,
    ) -> None:
        if init_mode not in INIT_MODES:
            raise ValueError(f"init_mode {init_mode!r}: choose one of {list(INIT_MODES)}")
        super().__init__(**kwargs)
        self.init_mode, self.eta, self.init_seed = init_mode, eta, init_seed

    def initial_state(self, arrays: ArrayRecord, grid: Grid) -> GlobalState:
        """From ``{module}.sb_A.weight``/``sb_B.weight`` (and ``sb_R.weight``) and the head in
        ``arrays``; zero factors (placeholders) start the federated LoRA-SB initialisation."""
        named = record_tensors(arrays)
        modules = modules_with_suffix(named, SB_A_SUFFIX)
        suffixes = (SB_A_SUFFIX, SB_B_SUFFIX, SB_R_SUFFIX)
        head = {key: t for key, t in named.items() if not key.endswith(suffixes)}
        fixed = {m: LowRank(named[m + SB_B_SUFFIX], named[m + SB_A_SUFFIX]) for m in modules}
        cores = {m: named[m + SB_R_SUFFIX] for m in modules if m + SB_R_SUFFIX in named}
        self.expect_replies(
            {m: f.inner_rank for m, f in fixed.items()}, named[modules[0] + SB_A_SUFFIX]
        )
        if len(cores) == len(modules) and all(f.U.any() and f.V.any() for f in fixed.values()):
            return self.rule.init_state_from_factors(fixed, cores, head)
        ranks = {f.inner_rank for f in fixed.values()}
        if len(ranks) != 1:
            raise ValueError(f"Fed-SB's fixed factors need one rank, got {sorted(ranks)}")
        shapes = {m: f.shape for m, f in fixed.items()}
        start = self._federated_init(grid, ranks.pop(), shapes)
        return self.rule.init_state_from_factors(start.fixed, start.cores, head)

    def _federated_init(self, grid: Grid, rank: int, shapes: dict[str, tuple[int, int]]) -> SBInit:
        """Gradient estimates from the sampled nodes, combined by their example counts; an
        estimate that fails its checks (`ReplyChecks.estimate`) is dropped."""
        node_ids = self._sample(grid, 1.0, self.min_train_nodes, "sb_init", 0)
        config = ConfigRecord(
            {
                SB_INIT_MODE_KEY: self.init_mode,
                SB_INIT_RANK_KEY: rank,
                SB_INIT_SEED_KEY: self.init_seed,
            }
        )
        queries = [
            Message(
                RecordDict({CONFIG_RECORD: config}),
                dst_node_id=node_id,
                message_type=f"{MessageType.QUERY}.{SB_INIT_ACTION}",
            )
            for node_id in node_ids
        ]
        answers = grid.send_and_receive(
            self._sending(SB_INIT_ACTION, queries), timeout=self.query_timeout
        )
        expected = estimate_shapes(self.init_mode, shapes, rank)
        replies, counts, estimates = [], [], []
        for message in self._accept_answers(answers, "sb_init"):
            try:
                count, estimate = self.checks.estimate(message.content, SB_INIT_ACTION, expected)
            except RejectedReply as error:
                self._drop(message.metadata.src_node_id, str(error))
                continue
            replies.append(message)
            counts.append(count)
            estimates.append(estimate)
        if not replies:
            raise RuntimeError("no node answered Fed-SB's initialisation query")
        self.setup_bytes_up = sum(serialized_bytes(m.content) for m in replies)
        if self.client_dp is not None:
            num_nodes = len(list(grid.get_node_ids()))
            estimates = [self.client_dp.private_estimate(estimates, len(queries), num_nodes)]
            counts = [1]
        if self.init_mode == "sign":
            gradients = [
                {m: e[m + GRADIENT_SUFFIX] for m in modules_with_suffix(e, GRADIENT_SUFFIX)}
                for e in estimates
            ]
            return sign_init(gradients, counts, rank, self.eta, seed=self.init_seed)
        sketches = [
            {
                m: GradientSketch(Y=e[m + SKETCH_Y_SUFFIX], Z=e[m + SKETCH_Z_SUFFIX])
                for m in modules_with_suffix(e, SKETCH_Y_SUFFIX)
            }
            for e in estimates
        ]
        return sketch_init(sketches, counts, rank, self.eta, seed=self.init_seed)


def estimate_shapes(
    mode: str, shapes: dict[str, tuple[int, int]], rank: int
) -> dict[str, tuple[int, int]]:
    """The tensors of one node's gradient estimate, by key: G (d_out x d_in) per module in
    ``sign`` mode; Y = G Omega (d_out x k) and Z = Psi G (l x d_in) in ``sketch`` mode."""
    expected = {}
    for module, (d_out, d_in) in shapes.items():
        if mode == "sign":
            expected[module + GRADIENT_SUFFIX] = (d_out, d_in)
            continue
        k, l = sketch_sizes((d_out, d_in), rank, DEFAULT_OVERSAMPLE)
        expected[module + SKETCH_Y_SUFFIX] = (d_out, k)
        expected[module + SKETCH_Z_SUFFIX] = (l, d_in)
    return expected
