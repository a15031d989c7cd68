"""The metrics columns that hold wall-clock seconds: two runs of the same seeds differ only there."""

from strategies.round_metrics import TIMING_COLUMNS

TIMING = ("seconds", *TIMING_COLUMNS, "server_eval_seconds")
