"""Each line of Flower's log is printed once in a process that has imported Opacus (as a DP run's
ServerApp and ClientApp processes do, through `opacus_module`): Opacus' root handler would print
it again."""

import subprocess
import sys

LOG_ONE_LINE = (
    "import logging\n"
    "from fedlora.privacy.opacus_logging import opacus_module\n"
    "opacus_module('opacus.accountants')\n"
    "from flwr.supercore import log\n"
    "log(logging.INFO, 'round 1 server metrics')\n"
)


def test_flower_s_log_is_printed_once_after_importing_opacus():
    done = subprocess.run(
        [sys.executable, "-c", LOG_ONE_LINE],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert (done.stdout + done.stderr).count("round 1 server metrics") == 1
