"""The ``fedlora`` command line, the top layer: it imports every other layer and none imports it.

`cli.main` dispatches by command name; each module holds one group of commands (its arguments
and what runs them): `cli.simulate` (demo, simulate, compare, dp-sweep), `cli.recipes`,
`cli.baselines`, `cli.bench` and `cli.bench_simulate` (benchmarks), `cli.deploy`. The package
loads fedlora's bytecode cache first (`fedlora.bytecode_cache`).
"""

from fedlora.bytecode_cache import use_bytecode_cache

use_bytecode_cache()  # before torch: hosts whose torch ships no bytecode
