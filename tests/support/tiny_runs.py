"""Run configs shared by the in-process tests: tiny BERT on BBC News, one short local step."""

TINY_BERT_RUN = {
    "model": "tiny-bert",
    "partitioner": "iid",
    "max-length": 16,
    "batch-size": 4,
    "local-steps": 1,
    "rank-profile": "2:0.5,4:0.5",
    "learning-rate": 0.01,
}
"""Two capacity classes, ranks 2 and 4, half of the clients each."""
