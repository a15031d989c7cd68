"""The apps on Flower's deployment engine: a real SuperLink with TLS and node authentication, real
SuperNodes of LoRA ranks 2, 4 and 8 as processes on 127.0.0.1, runs submitted with ``flwr run``.

The credentials come from `fedlora deploy init`'s writer, and the processes run the commands it
prints (`deployment.commands`). A deployed run must give the final global model that the same
apps give on the in-process grid with the same seeds (the strategy matrix and the Ray runs show
that Ray's simulation gives it too); the nodes' ranks and batch size come from their node config only (the
run config says rank 8 and batch 16 for everyone). Every process a test starts carries a tag in
its environment, which Flower's detached children (SuperExec, ServerApp and ClientApp processes)
inherit; teardown kills every tagged process (found in /proc), whatever happened.

The quick tests check what ``fedlora deploy init`` writes with Flower's own key loaders, its
insecure mode, and how a node's config sets its capacity.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import Context, RecordDict
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from safetensors.torch import load_file

from cli.main import main as cli_main
from clients.app import client_app
from clients.client import Client, node_run_config
from deployment.commands import (
    gateway_command,
    register_command,
    run_command,
    superlink_command,
    supernode_command,
)
from deployment.credentials import (
    CA_FILE,
    NODE_KEY_FILE,
    NODE_PUBLIC_KEY_FILE,
    node_key_pair,
    write,
    write_credentials,
)
from deployment.gateway import fleet_gateway, is_fleet_call
from deployment.startup import LOADING, PHASES, measure_startup
from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.models.base_model import load_base_model
from simulations.run_dir import read_metrics
from strategies.checkpoint import checkpoint_rounds
from strategies.run_record import FINISHED, read_manifest, read_status
from strategies.server_app import run
from tests.support.local_grid import LocalGrid
from tests.support.processes import START_TIMEOUT, Processes, free_port, tagged_pids, wait_for

PROJECT = Path(__file__).resolve().parents[2]
CONNECTION = "fedlora-test"
RANKS = (2, 4, 8)
NODE_BATCH = 8
RUN = {
    "model": "tiny-bert",
    "num-server-rounds": 2,
    "partitioner": "iid",
    "max-length": 32,
    "local-steps": 2,
    "learning-rate": 0.01,
    "min-train-nodes": 3,
    "fraction-evaluate": 0.34,
    "min-evaluate-nodes": 1,
    "base-changes": "messages",
    "evaluate-every": 3,
    "cpu-autocast": "off",
}
"""Every node trains, one evaluates, in the last round only (``evaluate-every`` past the runs'
rounds): each message starts a process that imports torch. In float32 (``flwr run``'s config says
``auto``), so that the deployed run and its in-process reference round alike to 1e-5."""
DEPLOYED = {**RUN, "rank-profile": "8:1.0", "batch-size": 16}
"""What the deployed run says; the nodes' own config sets ranks 2, 4, 8 and batch size 8."""
SIMULATED = {**RUN, "rank-profile": "2:0.34,4:0.33,8:0.33", "batch-size": NODE_BATCH}
RUN_TIMEOUT = 420
CLI_TIMEOUT = 300
"""``fedlora`` imports torch and transformers: minutes when the machine is busy."""
WATCH_EVERY = 0.2
"""Seconds between two looks at a node's processes (reads of /proc: cheap)."""
LIST_EVERY = 2.0
"""Seconds between two listings of the SuperLink's nodes: each is a ``flwr`` process of about a
second of CPU, and a node goes offline only after Flower's heartbeats (tens of seconds)."""
NOT_SOONER_AFTER_A_KILL = HEARTBEAT_DEFAULT_INTERVAL * (HEARTBEAT_PATIENCE - 1)
"""Seconds after a kill before the SuperLink can list a node offline or fail a run whose
ServerApp died: the last heartbeat came at most one interval before the kill, and one holds for
``HEARTBEAT_PATIENCE`` intervals (Flower's). The polls (``flwr`` processes) start then."""
ROUND_TIMEOUT = 240.0
"""Enough for a node's cold start (a fresh process imports torch) on a busy 2-core machine; a
node that dies is reported unavailable by Flower long before (two missed heartbeats)."""


SHARES_THE_FEDERATION = pytest.mark.xdist_group("federation")
"""The tests on the module's federation run on one pytest-xdist worker, which starts it once."""

PUBLIC_HOST = "127.0.0.2"
"""The public address (another loopback address): the Fleet gateway, where nodes and strangers
connect; the SuperLink itself listens on 127.0.0.1, the operators' path."""


class Federation:
    """A SuperLink with TLS, node authentication and a database on a private address, its Fleet
    gateway on the public one, and the nodes started against the gateway."""

    def __init__(self, folder: Path, num_nodes: int) -> None:
        self.folder = folder
        hosts = ["127.0.0.1", PUBLIC_HOST]
        self.files = write_credentials(folder / "credentials", num_nodes, hosts)
        self.processes = Processes(folder, folder / "flwr-home")
        self.port, self.public_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.public_address = f"{PUBLIC_HOST}:{self.public_port}"

    def start_superlink(self, name: str = "superlink") -> None:
        """The SuperLink on its database (a restart finds its registrations and runs there)."""
        self.processes.start(name, superlink_command(self.files.superlink, self.port))
        wait_for(lambda: self.nodes() is not None, "the SuperLink to answer", every=LIST_EVERY)

    def start_gateway(self) -> None:
        listen = self.public_address
        self.processes.start("gateway", gateway_command(self.files.superlink, listen, self.address))

    def connect(self) -> None:
        connect = [
            *fedlora_command("deploy", "connect", CONNECTION, self.address),
            *("--root-certificates", str(self.files.ca)),
        ]
        done = self.processes.run(connect, timeout=CLI_TIMEOUT)
        assert done.returncode == 0, done.stderr

    def register(self, index: int) -> None:
        public_key = self.files.node(index) / NODE_PUBLIC_KEY_FILE
        done = self.processes.run(register_command(public_key, CONNECTION), timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    def start_node(
        self, index: int, rank: int, folder: Path | None = None, name: str = ""
    ) -> subprocess.Popen:
        node_config = {
            "partition-id": index,
            "num-partitions": len(RANKS),
            "lora-rank": rank,
            "batch-size": NODE_BATCH,
            "device": "cpu",
            "state-dir": str(self.folder / f"state-{index}"),
        }
        command = supernode_command(
            folder or self.files.node(index), self.public_address, node_config, free_port()
        )
        return self.processes.start(name or f"node-{index}", command)

    def nodes(self) -> list[dict] | None:
        """The SuperLink's node list (None while it does not answer)."""
        try:
            done = self.processes.run(
                ["flwr", "supernode", "ls", CONNECTION, "--format", "json"], timeout=30
            )
        except subprocess.TimeoutExpired:
            return None
        try:
            return json.loads(done.stdout)["nodes"]
        except (json.JSONDecodeError, KeyError):
            return None

    def runs(self) -> list[dict]:
        """The SuperLink's runs, through the operators' path."""
        done = self.processes.run(["flwr", "ls", CONNECTION, "--format", "json"], timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)["runs"]

    def online(self) -> int:
        return sum(node["status"] == "online" for node in self.nodes() or [])

    def wait_online(self, count: int) -> None:
        wait_for(lambda: self.online() >= count, f"{count} nodes online", every=LIST_EVERY)

    def run(self, run_config: dict, run_dir: Path, timeout: float = RUN_TIMEOUT):
        """``flwr run`` of the project with these overrides; the rows of its metrics.jsonl."""
        overrides = {**run_config, "run-dir": str(run_dir)}
        done = self.processes.run(run_command(CONNECTION, overrides, str(PROJECT)), timeout=timeout)
        assert (run_dir / "metrics.jsonl").exists(), done.stdout[-3000:] + done.stderr[-3000:]
        return read_metrics(run_dir), done


def fedlora_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def start_federation(folder: Path) -> Federation:
    federation = Federation(folder, len(RANKS))
    try:
        federation.connect()
        federation.start_superlink()
        federation.start_gateway()
        for index, rank in enumerate(RANKS):
            federation.register(index)
            federation.start_node(index, rank)
        federation.wait_online(len(RANKS))
    except BaseException:
        federation.processes.stop()
        raise
    return federation


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    federation = start_federation(tmp_path_factory.mktemp("federation"))
    try:
        yield federation
    finally:
        federation.processes.stop()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "model.safetensors")


def relative_difference(deployed: dict, simulated: dict, base: dict) -> float:
    """The largest ||deployed - simulated|| over the tensors, relative to what training changed in
    the tensor, ||simulated - base||, or to its norm where training left it as it was."""
    worst = 0.0
    for key, tensor in simulated.items():
        change = (tensor - base[key]).norm()
        scale = change if change > 0 else tensor.norm()
        difference = (deployed[key] - tensor).norm()
        worst = max(worst, float(difference / scale) if scale > 0 else float(difference))
    return worst


def test_init_writes_credentials_that_flower_accepts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    root = tmp_path / "deploy"
    argv = ["deploy", "init", str(root), "--nodes", "2", "--host", "link.example", "10.1.2.3"]
    argv += ["--ranks", "2", "16"]

    assert cli_main(argv) == 0
    printed = capsys.readouterr().out

    ca = x509.load_pem_x509_certificate((root / CA_FILE).read_bytes())
    server = x509.load_pem_x509_certificate((root / "superlink" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["link.example"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    for index in range(2):
        folder = root / f"node-{index}"
        key = load_ssh_private_key((folder / NODE_KEY_FILE).read_bytes(), None)
        assert isinstance(key.curve, ec.SECP384R1)
        assert try_load_public_key(folder / NODE_PUBLIC_KEY_FILE) == public_key_to_bytes(
            key.public_key()
        )
        assert (folder / NODE_KEY_FILE).stat().st_mode & 0o777 == 0o600
        assert (folder / CA_FILE).read_bytes() == (root / CA_FILE).read_bytes()
        assert f"--auth-supernode-private-key node-{index}/node.key" in printed
        assert f"--port {9094 + index} " in printed
        assert f'state-dir="node-{index}/state"' in printed
    assert "lora-rank=2 " in printed and "lora-rank=16 " in printed
    assert (root / "superlink" / "server.key").stat().st_mode & 0o777 == 0o600
    connection = read_superlink_connection("fedlora")
    assert connection.address == "127.0.0.1:9093"
    assert connection.root_certificates == str((root / CA_FILE).resolve())
    assert "flower-superlink --host 127.0.0.1 --port 9093 " in printed
    assert "--enable-supernode-auth --database superlink/state.db" in printed
    assert "fedlora deploy gateway 0.0.0.0:9092 127.0.0.1:9093 " in printed
    assert "ssh -N -L 9093:127.0.0.1:9093 link.example" in printed
    assert "flower-supernode --superlink link.example:9092 " in printed
    assert "round-timeout=600.0" in printed and "runs/flwr/" in printed

    before = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    assert cli_main(argv) == 2
    assert {path: path.read_bytes() for path in root.rglob("*") if path.is_file()} == before


def test_init_insecure_writes_no_credentials(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    argv = ["deploy", "init", str(tmp_path / "deploy"), "--nodes", "1", "--insecure"]

    assert cli_main(argv) == 0

    printed = capsys.readouterr().out
    assert not (tmp_path / "deploy").exists()
    assert read_superlink_connection("fedlora").insecure
    assert "flower-superlink --host 127.0.0.1 --port 9093 --insecure" in printed
    assert "fedlora deploy gateway 0.0.0.0:9092 127.0.0.1:9093 --insecure" in printed
    assert "flower-supernode --superlink localhost:9092 --port 9094 --insecure" in printed


def test_init_insecure_does_not_replace_a_secure_connection(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    assert cli_main(["deploy", "init", str(tmp_path / "deploy"), "--nodes", "1"]) == 0
    config = tmp_path / "flwr-home" / "config.toml"
    secure = config.read_text()
    insecure = ["deploy", "init", str(tmp_path / "other"), "--nodes", "1", "--insecure"]
    capsys.readouterr()

    assert cli_main(insecure) == 2
    assert "'fedlora'" in capsys.readouterr().err and config.read_text() == secure
    assert cli_main([*insecure, "--force"]) == 0
    assert read_superlink_connection("fedlora").insecure


def test_init_refuses_ranks_that_do_not_fit_the_nodes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    argv = ["deploy", "init", str(tmp_path / "deploy"), "--nodes", "3", "--ranks", "2", "4"]

    assert cli_main(argv) == 2
    assert "--ranks" in capsys.readouterr().err
    assert not (tmp_path / "deploy").exists()


def test_gateway_answers_only_fleet_requests():
    """Nothing listens at the upstream address (port 9, discard): a Fleet call gets 502."""
    requests = [
        ("POST", "/v1/fleet/pull-messages"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/runtime/pull-messages"),
        ("GET", "/v1/fleet/pull-messages"),
        ("POST", "/v1/fleetx/pull-messages"),
    ]

    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=fleet_gateway("127.0.0.1:9", None))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return [await client.request(method, path, content=b"x") for method, path in requests]

    fleet, *others = zip(requests, asyncio.run(send()), strict=True)
    assert fleet[1].status_code == 502  # a SuperNode retries: the SuperLink is unavailable
    for request, response in others:
        assert response.status_code == 404, request
        assert "Fleet API only" in response.text
    assert is_fleet_call("/v1/fleet/pull-messages")
    for path in ("/v1/fleet/../control/start-run", "/v1/fleet/%2e%2e/control/start-run"):
        assert not is_fleet_call(path)
    assert not is_fleet_call("/v1/fleet/") and not is_fleet_call("/v1/fleet/pull-messages/x")
    assert cli_main(["deploy", "gateway", "0.0.0.0:9092", "127.0.0.1:9093"]) == 2


def test_node_config_sets_the_capacity_and_data():
    config = RunConfig(batch_size=16, device="auto", dataset="bbcnews", partitioner="dirichlet")
    node = {"partition-id": 1, "batch-size": 4, "device": "cpu", "data-path": "json:local.json"}

    own = node_run_config(config, node)

    assert (own.batch_size, own.device, own.dataset) == (4, "cpu", "json:local.json")
    assert (own.partitioner, own.server_eval_fraction) == ("iid", 0.0)
    assert node_run_config(config, {"partition-id": 0}) is config
    with pytest.raises(ConfigError, match="node config.*batch-size"):
        node_run_config(config, {"batch-size": 0})


def test_a_node_with_its_own_data_uses_all_of_it(tmp_path):
    rows = [{"text": f"article {i} on topic {i % 3}", "label": i % 3} for i in range(30)]
    (tmp_path / "mine.json").write_text(json.dumps(rows))
    node = {
        "partition-id": 2,
        "num-partitions": 3,
        "data-path": f"json:{tmp_path / 'mine.json'}",
        "batch-size": 4,
        "device": "cpu",
    }
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})

    client = Client.for_message(context, {"model": "tiny-bert", "test-fraction": 0.2})
    data = client.data()

    assert (len(data.train), len(data.test)) == (24, 6)
    texts = [*data.train["text"], *data.test["text"]]
    assert sorted(texts) == sorted(row["text"] for row in rows)
    assert (client.partition_id, client.config.batch_size, client.worker.device.type) == (
        2,
        4,
        "cpu",
    )


def assert_matches_simulation(rows: list[dict], run_dir: Path, run_config: dict, tmp_path: Path):
    """The deployed run's rows and final model against the same run of the project's apps on the
    in-process grid of three nodes (partition ids 0, 1, 2: ranks 2, 4, 8 from the rank profile)."""
    simulated_dir = tmp_path / "simulated"
    simulated = {**SIMULATED, **run_config}
    run(
        LocalGrid(client_app(simulated), num_nodes=len(RANKS)),
        {**simulated, "run-dir": str(simulated_dir)},
    )
    simulated_rows = read_metrics(simulated_dir)
    for row, expected in zip(rows, simulated_rows, strict=True):
        for key in ("train_loss", "loss", "client_accuracy"):
            if expected[key] is None:
                assert row[key] is None, (key, row, expected)
            else:
                assert row[key] == pytest.approx(expected[key], rel=1e-5), (key, row, expected)
    if run_config["strategy"] == "fedsa":  # personalized: no global model; the losses agree above
        return
    config = RunConfig.from_flower({k: v for k, v in SIMULATED.items() if k != "base-changes"})
    base = load_base_model(config).model.state_dict()
    deployed, simulated = final_weights(run_dir), final_weights(simulated_dir)
    assert deployed.keys() == simulated.keys()
    assert any((simulated[key] - base[key]).norm() > 0 for key in simulated)
    assert relative_difference(deployed, simulated, base) < 1e-5


@pytest.mark.slow
@SHARES_THE_FEDERATION
@pytest.mark.usefixtures("task_identity")
def test_deployed_run_matches_simulation(federation, tmp_path):
    """FedSA-LoRA deployed, its nodes keeping their B between rounds, against the simulation.
    FedEx-LoRA's deployment, its base changes travelling in the messages, is compared with the
    simulation at the end of the restart experiment below; FLoRA's, whose stacked base changes
    travel the same way, is checked in the node-restart test."""
    rows, done = federation.run({**DEPLOYED, "strategy": "fedsa"}, tmp_path / "deployed")

    assert [row["round"] for row in rows] == [1, 2], done.stdout[-3000:]
    assert all(row["clients"] == 3 for row in rows)
    assert rows[0]["loss"] is None and rows[0]["client_accuracy"] is None  # round 1 unevaluated
    assert_matches_simulation(rows, tmp_path / "deployed", {"strategy": "fedsa"}, tmp_path)


@pytest.mark.slow
@SHARES_THE_FEDERATION
def test_a_stranger_with_the_ca_reaches_only_the_fleet_api(federation, tmp_path):
    """From a Flower home of its own, holding only ca.pem, a stranger at the public address can
    register no node key, list no nodes or runs and submit no run; its own node key is refused
    by the Fleet API there."""
    stranger = Processes(tmp_path, tmp_path / "flwr-home")
    ca = tmp_path / CA_FILE
    write(ca, federation.files.ca.read_bytes())
    connect = fedlora_command("deploy", "connect", "public", federation.public_address)
    connected = stranger.run([*connect, "--root-certificates", str(ca)], timeout=CLI_TIMEOUT)
    assert connected.returncode == 0
    private_key, public_key = node_key_pair("stranger")
    write(tmp_path / NODE_KEY_FILE, private_key, private=True)
    write(tmp_path / NODE_PUBLIC_KEY_FILE, public_key)
    runs_before = federation.runs()

    attempts = {
        "register": register_command(tmp_path / NODE_PUBLIC_KEY_FILE, "public"),
        "list nodes": ["flwr", "supernode", "ls", "public"],
        "list runs": ["flwr", "ls", "public"],
        "run": run_command("public", {"num-server-rounds": 1}, str(PROJECT)),
    }
    for what, command in attempts.items():
        done = stranger.run(command, timeout=120)
        output = done.stdout + done.stderr
        assert done.returncode != 0 and "404" in output, (what, output[-2000:])
    node = federation.start_node(0, RANKS[0], tmp_path, name="stranger")
    node.wait(timeout=START_TIMEOUT)

    assert node.returncode != 0
    assert "Failed to activate SuperNode" in federation.processes.log("stranger")
    assert len(federation.nodes()) == len(RANKS)
    assert federation.runs() == runs_before


@pytest.mark.slow
@SHARES_THE_FEDERATION
def test_a_node_killed_mid_run_rejoins_when_restarted(federation, tmp_path):
    """Node 2 is killed while it trains round 1 of FLoRA; the round finishes with the other two
    once Flower reports node 2 unavailable (two missed heartbeats). Then it is started again
    (same key, same state-dir) and it trains again by round 3, caught up with the stacked base
    changes it missed: the round's model is the ideal one. Started again before its round has
    ended, it can be online again under its node id before the ServerApp's next pull, and the
    round then waits its whole ``round-timeout`` for the reply its killed process took."""
    run_dir = tmp_path / "run"
    overrides = {
        **DEPLOYED,
        "strategy": "flora",
        "num-server-rounds": 3,
        "min-train-nodes": 2,
        "round-timeout": ROUND_TIMEOUT,
        "run-dir": str(run_dir),
    }
    try:
        run = federation.processes.start("run", run_command(CONNECTION, overrides, str(PROJECT)))
        node_2 = ClientAppWatch(federation, "node-2")
        wait_for(
            lambda: run.poll() is not None or node_2.training(),
            "node 2 to train",
            RUN_TIMEOUT,
            every=WATCH_EVERY,
        )
        assert run.poll() is None, federation.processes.log("run")[-3000:]
        federation.processes.kill("node-2")
        wait_for_checkpoint(federation, "run", run, run_dir, 1)  # round 1 ended without node 2
        assert federation.online() == len(RANKS) - 1
        federation.start_node(2, RANKS[2], name="node-2-restarted")
        run.wait(timeout=RUN_TIMEOUT)
        rows = read_metrics(run_dir)
    finally:
        federation.processes.kill("run")
        if federation.online() < len(RANKS):
            federation.start_node(2, RANKS[2], name="node-2-again")
        federation.wait_online(len(RANKS))

    assert [row["round"] for row in rows] == [1, 2, 3], federation.processes.log("run")[-3000:]
    assert rows[0]["clients"] == 2 and rows[-1]["clients"] == 3
    assert rows[2]["relative_deviation"] < 1e-4


@pytest.mark.slow
@SHARES_THE_FEDERATION
@pytest.mark.usefixtures("task_identity")
def test_a_killed_serverapp_then_a_restarted_superlink_and_the_experiment_resumes_each_time(
    federation, tmp_path
):
    """Three rounds of FedEx-LoRA, interrupted twice, resumed each time by ``flwr run`` with
    ``resume = true`` as a new Flower run.

    1. After round 1's checkpoint only the ServerApp (Flower's detached ``flwr-serverapp`` child
       of the SuperLink) is killed; the SuperLink and the nodes stay up. The SuperLink fails the
       orphaned run once its heartbeats stop (``flwr ls``) and the nodes ignore its messages from
       then on (a ClientApp process that was pulling one when the run ended may be left waiting:
       Flower's).
    2. After round 2's checkpoint the SuperLink, and that run's ServerApp with it, is killed and
       started again on its database: the nodes go on under their node ids without being
       registered again.

    The experiment ends with rows 1-3, every node in each round, three Flower runs in its
    manifest, and the rows and final model of the same three rounds run uninterrupted on the
    in-process grid."""
    run_dir = tmp_path / "run"
    overrides = {
        **DEPLOYED,
        "strategy": "fedex",
        "num-server-rounds": 3,
        "round-timeout": ROUND_TIMEOUT,
        "run-dir": str(run_dir),
    }
    resume = {**overrides, "resume": True}
    node_ids = sorted(node["node-id"] for node in federation.nodes())

    first = federation.processes.start("orphaned", run_command(CONNECTION, overrides, str(PROJECT)))
    try:
        wait_for_checkpoint(federation, "orphaned", first, run_dir, 1)
        serverapps = processes_running(federation, "superlink", b"flwr-serverapp")
        assert len(serverapps) == 1, serverapps
        (orphaned,) = (entry["flower_run_id"] for entry in read_manifest(run_dir)["runs"])
        kill_pid(serverapps[0])
        wait_for(
            lambda: run_status(federation, orphaned).startswith("finished"),
            "the SuperLink to end the orphaned run",
            RUN_TIMEOUT,
            every=5,
            first_after=NOT_SOONER_AFTER_A_KILL,
        )
    finally:
        federation.processes.kill("orphaned")
    assert run_status(federation, orphaned) == "finished:failed"
    assert processes_running(federation, "superlink", b"flower-superlink")
    assert federation.online() == len(RANKS)

    second = federation.processes.start(
        "interrupted", run_command(CONNECTION, resume, str(PROJECT))
    )
    wait_for_checkpoint(federation, "interrupted", second, run_dir, 2)
    federation.processes.kill("superlink")
    federation.processes.kill("interrupted")
    federation.start_superlink("superlink-restarted")
    federation.wait_online(len(RANKS))
    assert sorted(node["node-id"] for node in federation.nodes()) == node_ids
    for index in range(len(RANKS)):  # the nodes waited (the gateway answered 502 meanwhile)
        assert tagged_pids(f"{federation.processes.tag}:node-{index}".encode()), index

    rows, done = federation.run(resume, run_dir, 2 * RUN_TIMEOUT)
    assert [row["round"] for row in rows] == [1, 2, 3], done.stdout[-3000:]
    assert all(row["clients"] == 3 for row in rows)
    runs = read_manifest(run_dir)["runs"]
    assert len(runs) == 3 and runs[0]["flower_run_id"] == orphaned
    assert read_status(run_dir) == FINISHED
    assert run_status(federation, runs[2]["flower_run_id"]) == "finished:completed"
    assert_matches_simulation(
        rows, run_dir, {"strategy": "fedex", "num-server-rounds": 3}, tmp_path
    )


def wait_for_checkpoint(
    federation: Federation, name: str, run: subprocess.Popen, run_dir: Path, round_: int
) -> None:
    """Wait until the experiment's checkpoints reach ``round_`` while ``flwr run`` is running."""
    wait_for(
        lambda: run.poll() is not None or max(checkpoint_rounds(run_dir), default=0) >= round_,
        f"round {round_}'s checkpoint",
        2 * RUN_TIMEOUT,
    )
    assert run.poll() is None, federation.processes.log(name)[-3000:]


def run_status(federation: Federation, run_id: int) -> str:
    """A run's status in ``flwr ls`` (e.g. ``running``, ``finished:failed``)."""
    (entry,) = [entry for entry in federation.runs() if int(entry["run-id"]) == run_id]
    return entry["status"]


def processes_running(federation: Federation, name: str, program: bytes) -> list[int]:
    """The live processes tagged ``name`` (and its detached children) running ``program``."""
    prefix = f"{federation.processes.tag}:{name}".encode()
    return [pid for pid in tagged_pids(prefix) if program in command_line(pid)]


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ClientAppWatch:
    """The ClientApp processes of one node, one per message (Flower's SuperExec starts one for
    each), watched from the run's start: the node's first message is its rank query, its second
    round 1's train message."""

    def __init__(self, federation: Federation, node: str) -> None:
        self.federation, self.node = federation, node
        self.first: int | None = None

    def training(self) -> bool:
        """Whether a ClientApp process other than the node's first is running: it has just
        started (a poll is far shorter than its imports of torch), so it cannot have replied."""
        running = processes_running(self.federation, self.node, b"flwr-clientapp")
        if self.first is None and running:
            self.first = min(running)
        return any(pid != self.first for pid in running)


def command_line(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
def test_startup_phases_add_up_in_a_fresh_process():
    result = measure_startup({"model": "tiny-bert", "partitioner": "iid"}, rank=2, repeats=1)

    (run,) = result["runs"]
    assert all(run[phase] > 0 for phase in PHASES)
    assert run["loading"] == pytest.approx(sum(run[phase] for phase in LOADING))
    assert sum(run[phase] for phase in PHASES) <= run["total"]
    assert result["median"] == result["min"] == run
