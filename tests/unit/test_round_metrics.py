"""The clients' training seconds of a round: the union of their training intervals, each clipped
to the training exchange (`strategies.round_metrics.covered_seconds`)."""

import pytest

from strategies.round_metrics import covered_seconds

WINDOW = (100.0, 110.0)


@pytest.mark.parametrize(
    ("intervals", "covered"),
    [
        ([], 0.0),
        ([(101.0, 103.0)], 2.0),
        ([(101.0, 103.0), (104.0, 105.5)], 3.5),  # one client after another: they add up
        ([(101.0, 103.0)] * 4, 2.0),  # a group's four clients report the group's interval
        ([(101.0, 104.0), (102.0, 106.0)], 5.0),  # side by side on one device: overlap once
        ([(101.0, 108.0), (102.0, 103.0), (104.0, 109.0)], 8.0),  # nested, then overlapping
        ([(95.0, 102.0), (109.0, 130.0)], 3.0),  # clipped to the exchange
        ([(0.0, 1e12)], 10.0),  # a client's clock far off cannot stretch it past the window
        ([(120.0, 125.0), (103.0, 101.0)], 0.0),  # outside the window; an end before its start
    ],
)
def test_covered_seconds(intervals, covered):
    assert covered_seconds(intervals, WINDOW) == pytest.approx(covered)
