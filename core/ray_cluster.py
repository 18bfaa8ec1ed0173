"""Joining a Ray cluster, for the sweep's training tasks and stage one's MLLM engines alike.

Ray is optional (`pip install 'mugcp[ray]'`) and imported only here, when asked for. An address is
checked before Ray is asked to join it: Ray itself waits minutes for a head that does not answer,
and raises on a malformed address or a missing client package with a traceback.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import socket
from typing import Optional

from mugcp.core.errors import UserError

ADDRESS = re.compile(r"(?:ray://)?(?P<host>[^:/\s]+):(?P<port>\d{1,5})")
FORMS = "local, auto, HOST:PORT (the head's GCS) or ray://HOST:PORT (Ray's client server)"


def join(address: Optional[str], option: str = "--ray") -> None:
    """`ray.init` for an address as a user gives it: None or "local" starts Ray on this machine, "auto" joins
    the cluster this machine belongs to, HOST:PORT or ray://HOST:PORT a remote one."""
    try:
        import ray
    except ImportError:
        raise UserError(f"{option} needs Ray: `pip install 'mugcp[ray]'`") from None
    if ray.is_initialized():
        return
    reachable(address, option)
    try:
        ray.init(address=None if address in (None, "local") else address, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot join the Ray cluster at {address} ({first}): start it with `ray start --head`, "
                        f"or use {option} local") from None


def reachable(address: Optional[str], option: str = "--ray") -> None:
    """Refuse, on one line and before any work, an address of no form Ray takes, a Ray client address without
    the client package, or a head nothing answers at (Ray would wait minutes, deaf to Ctrl-C)."""
    if address in (None, "local", "auto"):
        return
    found = ADDRESS.fullmatch(address)
    if found is None:
        raise UserError(f"{option} {address}: give {FORMS}")
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise UserError(f"{option} {address}: Ray's client needs grpcio: `pip install 'mugcp[ray]'`")
    try:
        socket.create_connection((found["host"], int(found["port"])), timeout=10).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address} ({e.strerror or type(e).__name__}): start it "
                        f"with `ray start --head`, or check the address") from None


def check_gpus(gpus: float, option: str) -> None:
    """Refuse a GPU request no live node of the joined cluster can meet: Ray would wait for it forever."""
    import ray

    if not gpus:
        return
    most = max((node["Resources"].get("GPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if most < gpus:
        raise UserError(f"{option} {gpus:g}: no node of the Ray cluster has {gpus:g} GPU(s) (the most on one node: "
                        f"{most:g}); ask for fewer, or 0 to run on CPUs")


def valid_gpus(gpus: Optional[float], option: str) -> Optional[float]:
    """Ray takes a fraction of one GPU, or whole GPUs."""
    if gpus is not None and gpus > 1 and gpus != int(gpus):
        raise UserError(f"{option} {gpus:g}: give a fraction of one GPU (0.5) or whole GPUs (2)")
    return gpus
