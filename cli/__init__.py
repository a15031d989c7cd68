"""The ``fedlora`` command line, the top layer: it imports every other layer and none imports it.

`cli.main` dispatches by command name; each module holds one group of commands (its arguments
and what runs them): `cli.simulate` (demo, simulate, compare, dp-sweep), `cli.recipes`,
`cli.baselines`, `cli.bench` and `cli.bench_simulate` (benchmarks), `cli.deploy`.
"""
