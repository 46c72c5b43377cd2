"""Two machines, simulated on this one: one launcher per node, as a user runs them on each machine (accelerate's
`--num_machines 2 --machine_rank K` with configs/accelerate/ddp_multinode.yaml, or torchrun's `--nnodes 2 --node_rank
K`), each started in a directory of its own and with its own FTUNE_HOME (a machine-local cache), meeting over a TCP
rendezvous on 127.0.0.1 (or, in a slow test, from two network namespaces over a virtual Ethernet link). What a second
machine adds over `--nproc 2` on one: each launcher's Hydra picks its own
default output_dir (relative to its own launch directory), transformers writes weights only on global rank 0 (the
second machine still builds its own cache), and the run directory may sit on storage the other machine cannot see."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import losses  # noqa: E402
from test_cli import ftune  # noqa: E402

from ftune.paths import configs_dir  # noqa: E402

# No dropout (each rank draws its own masks), a constant lr; 2 machines x batch 2 against 1 process x batch 4.
BASE = ["model=tiny_random", "data.size=64", "data.eval_size=0", "data.max_length=256", "data.packing=false",
        "eval=none", "trainer.progress=false", "peft.dropout=0", "trainer.lr=5e-3", "trainer.warmup_ratio=0",
        "trainer.scheduler=constant", "trainer.log_every=1", "trainer.max_steps=3"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_nodes(tmp_path: Path, launcher: str, args: list[str], prefixes: tuple[list[str], list[str]] = ((), ()),
                 master: str = "127.0.0.1", env: dict | None = None, timeout: float = 300,
                 stop_after_first: bool = False, node_args: tuple[list[str], list[str]] = ((), ())) -> list[tuple]:
    """Start node 0 and node 1 together (one process each), each in tmp_path/nodeK with FTUNE_HOME tmp_path/nodeK/home;
    `prefixes` go before each node's command, `node_args` after the launcher's own arguments; return [(returncode,
    stdout, stderr)] per node. `launcher`: accelerate, torchrun (static rendezvous at `master`) or torchrun-c10d (the
    c10d rendezvous, its store on node 0). `stop_after_first`: the other node is stopped once one has ended."""
    port = free_port()
    procs = []
    for k in (0, 1):
        node = tmp_path / f"node{k}"
        node.mkdir(exist_ok=True)
        node_env = {**os.environ, "ACCELERATE_USE_CPU": "true", "FTUNE_HOME": str(node / "home"),
                    "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "0", **(env or {})}
        if launcher == "accelerate":
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(configs_dir() / "accelerate" / "ddp_multinode.yaml"), "--num_machines", "2",
                   "--num_processes", "2", "--machine_rank", str(k), "--main_process_ip", master,
                   "--main_process_port", str(port), "--dynamo_backend", "no"]
        elif launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={k}",
                   "--nproc_per_node=1", f"--master_addr={master}", f"--master_port={port}"]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint={master}:{port}", f"--rdzv_id=test{port}",
                   f"--rdzv_conf=is_host={int(k == 0)}"]
        cmd = [*prefixes[k], *cmd, *node_args[k], "-m", "ftune.train", *args]
        # output to files: a worker outliving its launcher would hold a pipe open
        with open(tmp_path / f"node{k}.stdout", "w") as out, open(tmp_path / f"node{k}.stderr", "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=node, env=node_env, stdout=out, stderr=err, text=True))
    try:
        if stop_after_first:
            deadline = time.monotonic() + timeout
            while all(p.poll() is None for p in procs):
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(procs[0].args, timeout)
                time.sleep(0.5)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        for p in procs:
            p.wait(timeout=timeout)
    finally:  # SIGTERM: torch's launcher then stops its workers, which run in sessions of their own
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    return [(p.returncode, (tmp_path / f"node{k}.stdout").read_text(), (tmp_path / f"node{k}.stderr").read_text())
            for k, p in enumerate(procs)]


@pytest.mark.parametrize("launcher", ["accelerate", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_two_machines_train_one_run_like_one_process_with_the_global_batch(tmp_path, launcher):
    nodes = launch_nodes(tmp_path, launcher, [*BASE, "trainer.batch_size=2", "trainer.save_every=2"])
    for k, (rc, _, err) in enumerate(nodes):
        assert rc == 0, f"node {k}:\n{err[-3000:]}"
    # No output_dir was given: node 0's Hydra chose outputs/<date>/<time> under node0/, and node 1 wrote there too
    # (each rank saves its RNG state into every checkpoint), leaving nothing in a directory of its own.
    runs = [d for d in (tmp_path / "node0" / "outputs").glob("*/*") if d.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints" / "checkpoint-2").glob("rng_rank*.pt")) == \
        ["rng_rank0.pt", "rng_rank1.pt"]
    assert not [d for d in (tmp_path / "node1").rglob("*") if d.is_file() and "home" not in d.parts]
    assert not list((tmp_path / "node1" / "outputs").glob("*")), "node 1's own empty <date>/<time> folders are left"
    # Node 1 built its own model cache (FTUNE_HOME is per machine here), weights included.
    assert (tmp_path / "node1" / "home" / "models" / "tiny_random" / "model.safetensors").is_file()

    one = tmp_path / "one"
    r = ftune("train", *BASE, "trainer.batch_size=4", f"output_dir={one}", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # The 2 x 2 rows of a step are the 4 rows one process takes, and the gradients are averaged over the machines.
    l2, l1 = losses(run), losses(one)
    assert len(l2) == len(l1) == 3 and l2[-1] < l2[0]
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=0, atol=2e-5)
    w2, w1 = (load_file(r / "final" / "adapter_model.safetensors") for r in (run, one))
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)


def test_a_run_directory_the_other_machine_cannot_see_is_refused(tmp_path):
    """Node 1 runs in a mount namespace with an empty tmpfs over the shared directory: the same path, another disk."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"],
                                                          capture_output=True).returncode != 0:
        pytest.skip("needs `unshare --mount` (root or user namespaces) to give node 1 a file system of its own")
    shared = tmp_path / "shared"
    shared.mkdir()
    script = f'mount -t tmpfs tmpfs {shared} && exec "$@"'
    nodes = launch_nodes(tmp_path, "torchrun", [*BASE, "trainer.batch_size=2", f"output_dir={shared / 'run'}"],
                         prefixes=((), ["unshare", "--mount", "sh", "-c", script, "sh"]))
    for k, (rc, _, err) in enumerate(nodes):
        assert rc != 0, f"node {k} trained"
        said = f"output_dir={shared / 'run'} is not shared: rank 1 on {socket.gethostname()} cannot see"
        assert said in err, err[-3000:]
        assert "storage every machine mounts" in err
    # Refused before training: nothing written (the record comes after the checks), and rank 0 removed its probe.
    assert sorted(p.name for p in (shared / "run").iterdir()) == []


@pytest.mark.slow
def test_resume_on_two_machines_continues_the_same_trajectory(tmp_path):
    """Both machines resume from the checkpoint rank 0 wrote into the shared run directory (trainer.resume=auto on
    each): the resumed steps equal those of an uninterrupted two-machine run, bit for bit."""
    args = [*(a for a in BASE if not a.startswith("trainer.max_steps=")), "trainer.batch_size=2",
            "trainer.save_every=2"]
    full, cut = tmp_path / "full", tmp_path / "cut"

    def two_machines(*extra):
        for k, (rc, _, err) in enumerate(launch_nodes(tmp_path, "torchrun", [*args, *extra])):
            assert rc == 0, f"node {k}:\n{err[-3000:]}"

    two_machines("trainer.max_steps=6", f"output_dir={full}")
    two_machines("trainer.max_steps=3", f"output_dir={cut}")
    assert (cut / "checkpoints" / "checkpoint-2").is_dir()
    two_machines("trainer.max_steps=6", "trainer.resume=auto", f"output_dir={cut}")
    assert len(losses(full)) == 6 and [r["step"] for r in map(json.loads, (cut / "metrics.jsonl").read_text()
                                                              .splitlines()) if "loss" in r][-4:] == [3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor(losses(cut)[-4:]), torch.tensor(losses(full)[-4:]), rtol=0, atol=0)
    w_full, w_cut = (load_file(r / "final" / "adapter_model.safetensors") for r in (full, cut))
    for k, v in w_full.items():
        assert torch.equal(w_cut[k], v), k


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a virtual Ethernet pair: hosts 10.77.0.1 and 10.77.0.2, each with its own
    loopback (the hostname resolves to 127.0.0.1 in both, as on many machines), sharing this file system. Yields the
    command prefix that runs a process on each."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to make network namespaces")
    tag = f"ft{os.getpid() % 100000}"
    names, links = (f"{tag}a", f"{tag}b"), (f"{tag}x", f"{tag}y")
    steps = [["netns", "add", names[0]], ["netns", "add", names[1]],
             ["link", "add", links[0], "type", "veth", "peer", "name", links[1]]]
    for k in (0, 1):
        steps += [["link", "set", links[k], "netns", names[k]],
                  ["-n", names[k], "addr", "add", f"10.77.0.{k + 1}/24", "dev", links[k]],
                  ["-n", names[k], "link", "set", links[k], "up"], ["-n", names[k], "link", "set", "lo", "up"]]
    try:
        for step in steps:
            r = subprocess.run(["ip", *step], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot make two network namespaces here (ip {' '.join(step)}: {r.stderr.strip()})")
        yield tuple(["ip", "netns", "exec", n] for n in names)
    finally:
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.mark.slow
def test_two_hosts_on_their_own_network_train_like_one_process(tmp_path, two_hosts):
    """Two machines that reach each other only over a network (the test above shares one loopback): ftune points gloo
    at the interface routing to MASTER_ADDR, where gloo alone would bind to the hostname's 127.0.0.1 and each machine
    would tell the other to connect there."""
    args = [*BASE, "trainer.batch_size=2", f"output_dir={tmp_path / 'run'}"]
    nodes = launch_nodes(tmp_path, "accelerate", args, prefixes=two_hosts, master="10.77.0.1")
    for k, (rc, _, err) in enumerate(nodes):
        assert rc == 0, f"node {k}:\n{err[-3000:]}"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "GLOO_SOCKET_IFNAME=" in log and "(10.77.0.1, the route to MASTER_ADDR=10.77.0.1)" in log
    one = tmp_path / "one"
    r = ftune("train", *BASE, "trainer.batch_size=4", f"output_dir={one}", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "run")), torch.tensor(losses(one)), rtol=0, atol=2e-5)

    # The same machines with gloo held to the loopback: no group forms, and the rank whose connection is refused says
    # what to set. (gloo decides by port which rank of a pair connects; the other would wait for gloo's own timeout,
    # half an hour, and is stopped.)
    nodes = launch_nodes(tmp_path, "accelerate", [*BASE, f"output_dir={tmp_path / 'lo'}"], prefixes=two_hosts,
                         master="10.77.0.1", env={"GLOO_SOCKET_IFNAME": "lo"}, timeout=120, stop_after_first=True)
    said = [err for rc, _, err in nodes if rc != 0 and "could not connect to each other over gloo" in err]
    assert len(said) == 1, "\n".join(err[-2000:] for _, _, err in nodes)
    assert "set GLOO_SOCKET_IFNAME on every machine" in said[0]


@pytest.mark.slow
def test_torchrun_c10d_on_two_hosts_needs_each_machine_named_by_address(tmp_path, two_hosts):
    """torchrun's c10d rendezvous publishes rank 0's hostname as MASTER_ADDR, 127.0.0.1 on the other host here: that
    host's process is refused at once with the fix (it would wait 30 minutes for a main process on itself), and with
    the fix, `--local_addr` on each machine, the two train like one process with the global batch."""
    nodes = launch_nodes(tmp_path, "torchrun-c10d", [*BASE, f"output_dir={tmp_path / 'named'}"], prefixes=two_hosts,
                         master="10.77.0.1", timeout=180, stop_after_first=True)
    said = [err for rc, _, err in nodes if rc != 0 and "a loopback address, and nothing listens there" in err]
    assert len(said) == 1, "\n".join(err[-2000:] for _, _, err in nodes)
    assert "`--local_addr <its own IP>` on every machine" in said[0]

    args = [*BASE, "trainer.batch_size=2", f"output_dir={tmp_path / 'run'}"]
    nodes = launch_nodes(tmp_path, "torchrun-c10d", args, prefixes=two_hosts, master="10.77.0.1",
                         node_args=(["--local_addr=10.77.0.1"], ["--local_addr=10.77.0.2"]))
    for k, (rc, _, err) in enumerate(nodes):
        assert rc == 0, f"node {k}:\n{err[-3000:]}"
    one = tmp_path / "one"
    r = ftune("train", *BASE, "trainer.batch_size=4", f"output_dir={one}", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "run")), torch.tensor(losses(one)), rtol=0, atol=2e-5)


def _a_non_loopback_address() -> tuple[str, str] | None:
    """(interface, IPv4 address) of the interface this machine's default route leaves by, or None."""
    from ftune.training.network import _interface_with_address

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up, nothing is sent
            ip = sock.getsockname()[0]
    except OSError:
        return None
    name = None if ip.startswith("127.") else _interface_with_address(ip)
    return (name, ip) if name else None


def test_gloo_is_pointed_at_the_interface_that_reaches_the_main_machine(monkeypatch):
    from ftune.training.network import choose_gloo_interface

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # one machine: gloo's own choice is right
    assert choose_gloo_interface() is None and "GLOO_SOCKET_IFNAME" not in os.environ
    found = _a_non_loopback_address()
    if found is None:
        pytest.skip("this machine has no network interface besides the loopback")
    name, ip = found
    monkeypatch.setenv("MASTER_ADDR", ip)  # the main machine is this one, seen from the network
    assert choose_gloo_interface() == name and os.environ["GLOO_SOCKET_IFNAME"] == name
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # the user's own choice stays
    assert choose_gloo_interface() is None and os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no group to form
    assert choose_gloo_interface() is None and "GLOO_SOCKET_IFNAME" not in os.environ


def test_a_main_address_that_means_this_machine_is_refused_at_once(monkeypatch):
    """torchrun's c10d rendezvous publishes the main machine's hostname as MASTER_ADDR; where it resolves to a loopback
    address on another machine, that machine's processes would wait 30 minutes for a main process on themselves."""
    from ftune.config import ConfigError
    from ftune.training.network import check_main_address

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        monkeypatch.setenv("MASTER_ADDR", "localhost")
        monkeypatch.setenv("MASTER_PORT", str(free_port()))  # nothing listens there
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        with pytest.raises(ConfigError, match=r"MASTER_ADDR=localhost is .*127\.0\.0\.1.* a loopback address, and "
                                              r"nothing listens there .* only 1 of the run's 2 processes .*"
                                              r"`--local_addr <its own IP>` on every machine"):
            check_main_address(probe_timeout=2)
        monkeypatch.setenv("MASTER_PORT", str(busy))  # several "machines" on one host: the main process is here
        check_main_address(probe_timeout=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # every process on this machine
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    check_main_address(probe_timeout=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.255.255.1")  # an address of the network: torch connects, nothing is probed
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed a non-loopback address"))
    check_main_address(probe_timeout=2)


def test_a_group_that_cannot_connect_is_said_with_the_fix(monkeypatch):
    import accelerate

    from ftune.config import ConfigError
    from ftune.training import distributed

    def no_mesh(**kwargs):
        raise RuntimeError("Gloo connectFullMesh failed with [pair.cc:152] timed out connecting: SO_ERROR: Connection "
                           "refused, remote=[127.0.0.1]:18354")

    monkeypatch.setattr(accelerate, "Accelerator", no_mesh)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    cfg = type("Cfg", (), {"trainer": type("T", (), {"distributed": "ddp"})()})()
    with pytest.raises(ConfigError, match=r"could not connect to each other over gloo .*remote=\[127.0.0.1\].*"
                                          r"\(now lo\): set GLOO_SOCKET_IFNAME on every machine"):
        distributed._accelerator(cfg, "no")


@pytest.mark.slow
def test_a_machine_that_fails_at_start_up_stops_the_other_with_a_pointer(tmp_path):
    """The training file exists on node 0 only: node 1 stops with its data error, and node 0, waiting on it at a
    collective, says that another process ended and where to look (it was a gloo traceback), in seconds."""
    rows = [{"prompt": f"What is {i} + 1?", "completion": f"{i + 1}"} for i in range(32)]
    (tmp_path / "node0").mkdir()
    (tmp_path / "node0" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    start = time.monotonic()
    nodes = launch_nodes(tmp_path, "torchrun", ["model=tiny_random", "eval=none", "trainer.max_steps=2", "data=jsonl",
                                                "data.path=train.jsonl", f"output_dir={tmp_path / 'run'}",
                                                "trainer.dist_timeout=300"], timeout=240)
    assert time.monotonic() - start < 200  # not trainer.dist_timeout
    (rc0, _, err0), (rc1, _, err1) = nodes
    assert rc1 != 0 and "ftune: data error: train.jsonl: no such file" in err1, err1[-3000:]
    assert rc0 != 0 and ("ftune: distributed error: rank 0 of 2: another training process (at 127.0.0.1:"
                         in err0), err0[-3000:]
    assert "read that process's output" in err0 and "Connection closed by peer" not in err0


def test_a_process_gone_at_a_collective_is_said():
    from ftune.training.network import peer_closed_said

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[10.1.2.3]:22238. This is typically caused by a remote worker crashing.")
    said = peer_closed_said(gloo)
    assert said.startswith("another training process (at 10.1.2.3:22238) ended while this one waited on it")
    assert "trainer.resume=auto" in said
    assert peer_closed_said(RuntimeError("CUDA out of memory")) is None
