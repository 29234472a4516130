"""A local EVM dev node (anvil) for tests, benchmarks and the demo, and activity on it.

``DevNode.start()`` runs the anvil platform binary (installed by ``scripts/bootstrap.sh`` under
``.trace/node``; ``TRACE_ANVIL`` overrides the path) on a free loopback port with chain id
10143 (Monad testnet's), waits until ``eth_chainId`` answers, and ``stop()`` ends it by PID.
``Rpc`` is a minimal JSON-RPC client over the standard library; ``make_activity`` mines blocks
with contract deploys, ERC-20 ``Transfer`` logs, ETH transfers and empty blocks, without a
compiler; ``make_history`` does the same on an interval-mining node and ``LiveActivity`` keeps
sending transactions to one from a thread (the demo's live chain).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs

CHAIN_ID = 10143
_REPO_ROOT = Path(__file__).resolve().parents[3]
_BUNDLED = _REPO_ROOT / ".trace/node/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"

#: keccak256("Transfer(address,address,uint256)")
TRANSFER_TOPIC = "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"

#: An ERC-20-like token without a compiler. Runtime (50 bytes): calldata is ``to`` (one 32-byte
#: word) then ``amount`` (one word); it emits ``Transfer(caller, to, amount)`` exactly as an
#: ERC-20 does (LOG3: topic0 TRANSFER_TOPIC, topic1 from, topic2 to, data the amount) and stops
#: (no balances). Init code (11 bytes) returns the runtime.
_RUNTIME = (
    "602060206000" + "37"  # CALLDATACOPY(mem 0, calldata 32, 32 bytes): the amount
    "600035"  # CALLDATALOAD(0): to
    "33"  # CALLER: from
    "7f" + TRANSFER_TOPIC + "60206000" + "a3" + "00"  # LOG3(mem 0, 32, topic0, from, to); STOP
)
LOG_CONTRACT_INIT = "0x603280600b6000396000f3" + _RUNTIME
assert len(bytes.fromhex(_RUNTIME)) == 0x32


class RpcError(Exception):
    """A JSON-RPC error answer (``code``, ``message``) or an unreachable node (``code`` None)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@attrs.define
class Rpc:
    """A blocking JSON-RPC client over ``urllib`` (one request per call)."""

    url: str
    timeout_s: float = 10.0
    _next_id: int = 0

    def call(self, method: str, *params: Any) -> Any:
        self._next_id += 1
        body = json.dumps(
            {"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": list(params)}
        ).encode()
        req = urllib.request.Request(
            self.url, body, headers={"content-type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                answer = json.loads(resp.read())
        except (urllib.error.URLError, OSError) as exc:
            raise RpcError(f"{method}: node unreachable at {self.url}: {exc}") from exc
        if "error" in answer:
            err = answer["error"]
            raise RpcError(f"{method}: {err.get('message')}", err.get("code"))
        return answer["result"]

    def block_number(self) -> int:
        return int(self.call("eth_blockNumber"), 16)


def anvil_path() -> str:
    """The anvil binary: ``TRACE_ANVIL``, the bootstrap's copy, or ``anvil`` on PATH."""
    explicit = os.environ.get("TRACE_ANVIL")
    if explicit:
        return explicit
    if _BUNDLED.is_file():
        return str(_BUNDLED)
    found = shutil.which("anvil")
    if found is None:
        raise FileNotFoundError("anvil not found: run scripts/bootstrap.sh (needs npm)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@attrs.define
class DevNode:
    """One anvil process. ``block_time_s`` None mines a block per transaction (automine)."""

    proc: subprocess.Popen[bytes]
    port: int
    cache_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rpc(self) -> Rpc:
        return Rpc(self.url)

    @classmethod
    def start(
        cls,
        *,
        chain_id: int = CHAIN_ID,
        block_time_s: float | None = None,
        ready_timeout_s: float = 30.0,
        log_path: Path | None = None,
        fork_url: str | None = None,
        fork_block: int | None = None,
    ) -> DevNode:
        """Start anvil; with ``fork_url`` it forks that node at ``fork_block`` (anvil's fork
        mode: the blocks up to it are the other node's, with their hashes; the blocks it mines
        after are its own, another fork of the same history)."""
        # --prune-history: keep the last 1,024 states in memory and persist none. Without it anvil
        # writes historical states to disk (by default under ~/.foundry/anvil/tmp) and never
        # removes them: long test and bench runs left tens of gigabytes there. Trace reads blocks,
        # transactions, receipts and logs, never historical state. The cache path is the node's
        # own directory all the same, removed by stop().
        cache_dir = Path(tempfile.mkdtemp(prefix="trace-anvil-"))
        argv = [anvil_path(), "--host", "127.0.0.1", "--chain-id", str(chain_id), "--silent"]
        argv += ["--prune-history", "1024", "--cache-path", str(cache_dir)]
        if block_time_s is not None:
            argv += ["--block-time", str(block_time_s)]
        if fork_url is not None:
            argv += ["--fork-url", fork_url]
            if fork_block is not None:
                argv += ["--fork-block-number", str(fork_block)]
        for _ in range(5):  # the chosen port may be taken before anvil binds it
            port = _free_port()
            out = open(log_path, "ab") if log_path else subprocess.DEVNULL
            try:
                proc = subprocess.Popen(
                    [*argv, "--port", str(port)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            finally:
                if log_path:
                    out.close()  # type: ignore[union-attr]
            node = cls(proc, port)
            if node._wait_ready(ready_timeout_s):
                node.cache_dir = cache_dir
                return node
            node.stop()
        shutil.rmtree(cache_dir, ignore_errors=True)
        raise RuntimeError("anvil did not become ready")

    def _wait_ready(self, timeout_s: float) -> bool:
        rpc = Rpc(self.url, timeout_s=1.0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(RpcError):
                rpc.call("eth_chainId")
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Terminate the process (by PID), then kill it if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir, ignore_errors=True)


@attrs.define
class Activity:
    """What ``make_activity`` did: the contract and how many txs it sent."""

    contract: str
    txs: int
    contract_calls: int


@attrs.frozen
class Chain:
    """A started node, the activity made on it and its head after that activity."""

    node: DevNode
    rpc: Rpc
    activity: Activity
    head: int


def deploy_log_contract(rpc: Rpc, sender: str) -> str:
    """Deploy the token contract from raw bytecode; returns its address."""
    tx = rpc.call("eth_sendTransaction", {"from": sender, "data": LOG_CONTRACT_INIT})
    address: str = wait_receipt(rpc, tx)["contractAddress"]
    return address


def wait_receipt(rpc: Rpc, tx: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Poll until ``tx`` is mined (so the next block a caller makes does not include it)."""
    deadline = time.monotonic() + timeout_s
    while (receipt := rpc.call("eth_getTransactionReceipt", tx)) is None:
        if time.monotonic() > deadline:
            raise RpcError(f"{tx}: not mined after {timeout_s:g}s")
        time.sleep(0.02)
    out: dict[str, Any] = receipt
    return out


def make_activity(rpc: Rpc, blocks: int) -> Activity:
    """Mine about ``blocks`` blocks on an automining node, cycling through: a block with a
    token call (one ERC-20 Transfer log) and an ETH transfer, a block with one ETH transfer,
    and an empty block. Deploys the contract first (one more block)."""
    accounts: list[str] = rpc.call("eth_accounts")
    sender, receiver = accounts[0], accounts[1]
    contract = deploy_log_contract(rpc, sender)
    txs, calls = 1, 0
    for i in range(blocks):
        kind = i % 3
        if kind == 0:
            rpc.call("evm_setAutomine", False)
            amount = (i + 1).to_bytes(32, "big").hex()
            rpc.call(
                "eth_sendTransaction",
                {
                    "from": sender,
                    "to": contract,
                    "data": "0x" + receiver[2:].rjust(64, "0") + amount,
                },
            )
            sent = rpc.call(
                "eth_sendTransaction", {"from": sender, "to": receiver, "value": hex(i + 1)}
            )
            rpc.call("evm_mine")
            rpc.call("evm_setAutomine", True)
            wait_receipt(rpc, sent)
            txs, calls = txs + 2, calls + 1
        elif kind == 1:
            sent = rpc.call(
                "eth_sendTransaction", {"from": receiver, "to": sender, "value": hex(i + 1)}
            )
            wait_receipt(rpc, sent)
            txs += 1
        else:
            rpc.call("evm_mine")
    return Activity(contract, txs, calls)


def mine_empty(rpc: Rpc, blocks: int) -> None:
    """Mine ``blocks`` empty blocks (anvil_mine in batches of 200: it slows superlinearly)."""
    while blocks > 0:
        n = min(blocks, 200)
        rpc.call("anvil_mine", hex(n))
        blocks -= n


def _token_call(token: str, sender: str, to: str, amount: int) -> dict[str, str]:
    return {
        "from": sender,
        "to": token,
        "data": "0x" + to[2:].rjust(64, "0") + amount.to_bytes(32, "big").hex(),
    }


def make_history(rpc: Rpc, blocks: int) -> Activity:
    """Mine about ``blocks`` blocks now on a node that mines on an interval (``block_time_s``),
    with ``evm_mine`` (a transaction sent just before may land in the interval's block
    instead: counts are the node's, not these). Cycles as ``make_activity``: a token transfer
    and an ETH transfer, an ETH transfer, an empty block."""
    accounts: list[str] = rpc.call("eth_accounts")
    sender, receiver = accounts[0], accounts[1]
    tx = rpc.call("eth_sendTransaction", {"from": sender, "data": LOG_CONTRACT_INIT})
    rpc.call("evm_mine")
    contract: str = wait_receipt(rpc, tx)["contractAddress"]
    txs, calls = 1, 0
    for i in range(blocks):
        kind = i % 3
        if kind == 0:
            rpc.call("eth_sendTransaction", _token_call(contract, sender, receiver, i + 1))
            rpc.call("eth_sendTransaction", {"from": sender, "to": receiver, "value": hex(i + 1)})
            txs, calls = txs + 2, calls + 1
        elif kind == 1:
            rpc.call("eth_sendTransaction", {"from": receiver, "to": sender, "value": hex(i + 1)})
            txs += 1
        rpc.call("evm_mine")
    return Activity(contract, txs, calls)


class LiveActivity:
    """Sends transactions to a node from a thread until ``stop()``: mostly ERC-20 transfers of
    a few tokens between the dev accounts, ETH transfers, and now and then a new token
    deployed. The node mines them on its own interval."""

    def __init__(self, url: str, *, every_s: float = 0.3, seed: int = 7) -> None:
        self.rpc = Rpc(url, timeout_s=5.0)
        self.every_s = every_s
        self.sent = 0
        self.errors = 0
        self._random = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-activity", daemon=True)

    def start(self) -> LiveActivity:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        try:
            accounts: list[str] = self.rpc.call("eth_accounts")[:5]
            tokens: list[str] = []
            deploying: list[str] = []  # deployment transactions not mined yet
        except RpcError:
            self.errors += 1
            return
        step = 0
        while not self._stop.wait(self.every_s):
            rnd = self._random
            sender, to = rnd.sample(accounts, 2)
            try:
                for tx in list(deploying):
                    receipt = self.rpc.call("eth_getTransactionReceipt", tx)
                    if receipt is not None:
                        deploying.remove(tx)
                        tokens.append(receipt["contractAddress"])
                if step % 40 == 0:
                    deploy = {"from": sender, "data": LOG_CONTRACT_INIT}
                    deploying.append(self.rpc.call("eth_sendTransaction", deploy))
                elif step % 3 == 2 or not tokens:
                    value = hex(rnd.randrange(1, 10**18))
                    self.rpc.call("eth_sendTransaction", {"from": sender, "to": to, "value": value})
                else:
                    amount = rnd.randrange(1, 10**24)
                    call = _token_call(rnd.choice(tokens), sender, to, amount)
                    self.rpc.call("eth_sendTransaction", call)
                self.sent += 1
            except RpcError:
                self.errors += 1  # the node stopped or refused: keep trying until stop()
            step += 1
