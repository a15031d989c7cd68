"""Running many clients: recipes (TOML), the Ray-backed simulation runner, comparisons and the
``fedlora`` command line.

Importing this package turns Flower's telemetry off unless ``FLWR_TELEMETRY_ENABLED`` is set
(Flower reads it once, when ``flwr`` is first imported; these machines have no network for it).
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
