"""How the processes of a run spread over machines find each other: the main machine's address, gloo's network
interface, and what a timeout at a collective means. torch and gloo leave these to the user, and a wrong guess
shows only as a wait of trainer.dist_timeout; ftune checks them before the process group forms."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket

import torch

from ftune.config import ConfigError

log = logging.getLogger(__name__)


def _interface_with_address(ip: str) -> str | None:
    """The name of this machine's network interface holding the IPv4 address `ip` (Linux: SIOCGIFADDR per interface)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    return None


def check_main_address(probe_timeout: float = 5.0) -> None:
    """Refuse at once a run spread over several machines whose MASTER_ADDR means "this machine" on this one.

    torchrun's c10d rendezvous (`--rdzv_backend c10d --rdzv_endpoint HOST:PORT`) publishes the main machine's own name
    (`socket.getfqdn()`) as MASTER_ADDR unless its `--local_addr` is given. Where that name resolves to a loopback
    address on the other machines (containers; /etc/hosts lines such as `127.0.0.1 localhost <hostname>`), their
    processes look for the main process on themselves and wait, without a word, for trainer.dist_timeout (30 min). A
    loopback MASTER_ADDR with nothing listening at MASTER_PORT, while some of the run's processes are on other
    machines (WORLD_SIZE > LOCAL_WORLD_SIZE), is that case; several "machines" on one host find the listener and pass.
    """
    master, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if not master or not port.isdigit() or not 0 < local < world:
        return
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(master, int(port), type=socket.SOCK_STREAM)}
    except OSError:  # unresolvable: torch says so itself, at once
        return
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        return
    try:
        socket.create_connection((master, int(port)), timeout=probe_timeout).close()
        return
    except OSError:
        pass
    raise ConfigError(
        f"MASTER_ADDR={master} is {', '.join(sorted(addresses))} on this machine ({socket.gethostname()}), a loopback "
        f"address, and nothing listens there at MASTER_PORT={port}; yet only {local} of the run's {world} processes "
        f"are on this machine. The main machine was named by an address that means \"this machine\" here, so this "
        f"process would wait out trainer.dist_timeout. torchrun's c10d rendezvous publishes the hostname of "
        f"whichever machine becomes rank 0: give torchrun `--local_addr <its own IP>` on every machine. Or launch "
        f"with an address every machine reaches (torchrun `--master_addr IP --node_rank K`, accelerate "
        f"`--main_process_ip IP`), or make each hostname resolve to its machine's network address everywhere "
        f"(/etc/hosts, DNS).")


def choose_gloo_interface() -> str | None:
    """Set GLOO_SOCKET_IFNAME, where it is unset, to the interface that reaches MASTER_ADDR; returns the name set.

    gloo binds each process to the address its machine's hostname resolves to. On many machines (Debian and Ubuntu's
    `127.0.1.1 <hostname>` line in /etc/hosts, containers) that is a loopback address, so with ranks on several
    machines each tells the others to connect to 127.0.x.x and the group never forms ("Gloo connectFullMesh failed
    ... Connection refused, remote=[127.0.0.1]"). The interface the kernel routes MASTER_ADDR through is the one the
    other machines can reach. Nothing is set for one machine (MASTER_ADDR a loopback address), an IPv6 or unresolvable
    MASTER_ADDR, or an interface that cannot be named; torch and gloo offer no such choice themselves."""
    master = os.environ.get("MASTER_ADDR")
    if os.environ.get("GLOO_SOCKET_IFNAME") or not master or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    try:
        master_ip = socket.getaddrinfo(master, None, socket.AF_INET)[0][4][0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((master_ip, 9))  # UDP: no packet is sent; the kernel picks the route and the source address
            local_ip = sock.getsockname()[0]
        name = None if local_ip.startswith("127.") else _interface_with_address(local_ip)
    except (OSError, IndexError, ImportError):  # ImportError: no fcntl (Windows)
        return None
    if name:
        os.environ["GLOO_SOCKET_IFNAME"] = name
        log.info("GLOO_SOCKET_IFNAME=%s (%s, the route to MASTER_ADDR=%s); set it yourself to choose another",
                 name, local_ip, master)
    return name


def connect_failure_said(e: BaseException) -> str | None:
    """The fix for gloo's "connectFullMesh failed" (the processes could not reach each other while the group formed),
    or None for any other error."""
    if "connectFullMesh" not in str(e):
        return None
    return (f"The training processes could not connect to each other over gloo ({str(e).strip().splitlines()[-1]}). "
            f"gloo binds each process to the address of its machine's hostname ({socket.gethostname()} here) or to "
            f"the interface in GLOO_SOCKET_IFNAME (now {os.environ.get('GLOO_SOCKET_IFNAME', 'unset')}): set "
            f"GLOO_SOCKET_IFNAME on every machine to the network interface the other machines reach it through "
            f"(`ip -br addr` lists them), or map the hostname to that interface's address in /etc/hosts.")


def _this_rank() -> str:
    """"rank R of W" in an initialised process group, else ""."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ""
    return f"rank {torch.distributed.get_rank()} of {torch.distributed.get_world_size()}"


def collective_timeout_said(e: BaseException, cfg) -> str | None:
    """The fix for gloo's "Timed out waiting Nms for recv operation" (a process waited trainer.dist_timeout at a
    collective), or None for any other error. (NCCL's watchdog ends a timed-out process itself, with its own log.)"""
    found = re.search(r"Timed out waiting (\d+)ms for \w+ operation", str(e))
    if not found or not _this_rank():
        return None
    waited = int(found.group(1)) / 1000
    setting = getattr(getattr(cfg, "trainer", None), "dist_timeout", "unset")
    return (f"{_this_rank()} waited {waited:g} s (trainer.dist_timeout={setting}) for the other processes at a "
            f"collective operation, and they did not come ({found.group(0)}). Either another process was still busy "
            f"(rank 0 converts or downloads the model and fills the tokenization cache before the others start; "
            f"evaluation and saving can be long too) or it failed: look at the other processes' output for an error. "
            f"To wait longer, raise trainer.dist_timeout (seconds).")


def peer_closed_said(e: BaseException) -> str | None:
    """What gloo's "Connection closed by peer [ADDR]:PORT" means (another process ended while this one waited on it
    in a collective, typically after its own error), or None for any other error. Across machines that error is often
    something true only there: a file missing on that machine, a full disk, a cache it cannot write."""
    found = re.search(r"Connection (?:closed|reset) by peer \[?([^\]\s]+?)\]?:(\d+)", str(e))
    if not found:
        return None
    me = f"{_this_rank()}: " if _this_rank() else ""
    return (f"{me}another training process (at {found.group(1)}:{found.group(2)}) ended while this one waited on it, "
            f"most likely with its own error: read that process's output (on a run across machines, that machine's "
            f"log) for what to fix. This process stops too; checkpoints already complete are kept, and the run goes on "
            f"from the newest with trainer.resume=auto.")
