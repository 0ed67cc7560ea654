"""A NAT lab in Linux network namespaces, for hole punching tests and benchmarks.

Theory of operation
===================

Topology. One lab is a set of network namespaces whose names all start with
the lab's prefix, ``pkl-<creator pid>-<sequence>``::

    {prefix}-inet   the internet: bridge br0, no address of its own
    {prefix}-seed   a public host, 203.0.113.2, on the bridge
    {prefix}-a      side a's host
    {prefix}-a-nat  side a's router (absent for NatType.NONE)
    {prefix}-b ...  and so on, one host (and router) per side

A side without NAT puts its host on the bridge with a public address. A NAT'd
side has a router with a WAN veth on the bridge (public address) and a LAN veth
to its host; the host has a private address and its default route through the
router, which forwards (ip_forward=1). For side number i (0 for a)::

    public (host or router WAN)  203.0.113.(11 + i)/24
    router LAN                   10.0.(i + 1).1/24
    host behind the router       10.0.(i + 1).2/24

Every interface lives inside a lab namespace (veth pairs are created in the
internet namespace with the far end moved straight into its own), so labs never
collide with each other or with the root namespace, and deleting the lab's
namespaces deletes all of its links. Addresses repeat from lab to lab; that is
harmless because no two labs share a namespace.

NAT types, as the router's iptables nat table (RFC 4787 terms)::

    NONE             no router
    FULL_CONE        DNAT of every UDP datagram to the WAN address onto the
                     host, SNAT of the host to the WAN address (ports are kept
                     when free): endpoint-independent mapping and filtering
    PORT_RESTRICTED  MASQUERADE: endpoint-independent mapping (the port is kept
                     when free), address-and-port-dependent filtering
    SYMMETRIC        MASQUERADE --random-fully: a random port for every new
                     destination (address-and-port-dependent mapping) and
                     address-and-port-dependent filtering

Linux cannot make an address-restricted cone: conntrack admits a reply only when
it matches the whole tuple, port included.

The CPE filter. Every router also drops whatever arrives on its WAN interface
(INPUT and FORWARD) unless conntrack says it is RELATED or ESTABLISHED, or (full
cone) it was let in by the DNAT rule. This is not cosmetic. Without it, a punch
that reaches a router before its own host has sent anything goes to the
router's INPUT chain, and conntrack confirms an entry for it. When the host
then sends to that peer, its mapping would collide with that stale entry, so
the NAT picks another port, and the peer's punches to the advertised port go
nowhere. Measured on port-restricted pairs without the filter: 2 punches in 6
succeed when both sides start together, 0 in 6 when one starts 0.2 s first;
with it, 6 in 6 both ways. A packet dropped by a filter rule is never confirmed
in conntrack, so the early punch leaves no trace. ``stateful_filter=False``
builds routers without it.

Conntrack UDP timeouts are the kernel's per-namespace defaults (30 s for an
entry that saw one direction only, 120 s once both directions were seen). The
kernel this was built on has no sch_netem: no added latency or loss.

Expected outcome. Of the 16 ordered pairs of the four types, 13 can be hole
punched, provided each side answers the address a peer's punch came from; the
3 that cannot are symmetric with port-restricted (both orders) and symmetric
with symmetric: there, each side's punches go to a port that the other side's
NAT never opened for it (see ``can_hole_punch``).

Processes. ``exec_argv`` prefixes a command with ``ip netns exec NS``, which
changes only the network namespace, so ``sys.executable`` (the repo's venv
Python) runs inside as it is. Clean-up kills every process in the lab's
namespaces (found with ``ip netns pids``, killed by PID: TERM, then KILL) and
deletes the namespaces. It is idempotent and runs on every exit path: leaving
the ``with`` (normally, on an exception, on KeyboardInterrupt), at interpreter
exit (atexit), and on SIGTERM (the handler cleans up, then does what the
previous handler would have, by default dying of the signal). A lab whose
creator was SIGKILLed is left behind; ``cleanup_stale`` (which every new lab
runs first) removes the namespaces of labs whose creator pid is dead.

Usage::

    with NatLab([NatType.PORT_RESTRICTED, NatType.SYMMETRIC]) as lab:
        a, b = lab.hosts
        subprocess.run(lab.exec_argv(a, [sys.executable, "-c", "..."]))

``async with NatLab(...)`` does the same from trio, building and cleaning up in
a worker thread so the event loop keeps running.
"""

from __future__ import annotations

import atexit
import enum
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Self

import trio

__all__ = [
    "PREFIX",
    "SEED_ADDRESS",
    "Host",
    "LabError",
    "NatLab",
    "NatType",
    "can_hole_punch",
    "cleanup_stale",
    "lab_available",
]

PREFIX = "pkl-"
"""Every lab namespace starts with this, then the creator's pid and a dash."""

SEED_ADDRESS = "203.0.113.2"
PUBLIC_PREFIX_LEN = 24
_PUBLIC_NET = "203.0.113."
_MAX_SIDES = 26  # sides are named a..z
_STALE_RE = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
_COMMAND_TIMEOUT = 30.0


class NatType(enum.Enum):
    NONE = "none"
    FULL_CONE = "full-cone"
    PORT_RESTRICTED = "port-restricted"
    SYMMETRIC = "symmetric"


def can_hole_punch(a: NatType, b: NatType) -> bool:
    """Whether a plain UDP hole punch between these two types can succeed.

    A symmetric NAT sends each punch from a fresh port, unknown to the peer in
    advance; that only works if the peer's NAT lets it in (none, full cone) so
    the peer can answer the port it came from. A port-restricted or symmetric
    peer drops it.
    """
    hard = {NatType.PORT_RESTRICTED, NatType.SYMMETRIC}
    return not (
        (a is NatType.SYMMETRIC and b in hard) or (b is NatType.SYMMETRIC and a in hard)
    )


@dataclass(frozen=True)
class Host:
    """A host in the lab.

    name: its network namespace. label: "seed", or the side's letter (a for
    the first side). address: its own IP address (private behind a NAT). public_address: the address the internet sees it as (its own for
    NONE and for the seed, the router's WAN address behind a NAT). router: the
    router's namespace, None without NAT.
    """

    name: str
    label: str
    address: str
    public_address: str
    nat: NatType
    router: str | None = None


class LabError(RuntimeError):
    """A command building or inspecting the lab failed."""


def _run(
    argv: Sequence[str], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT,
        check=False,
    )
    if check and result.returncode != 0:
        raise LabError(
            f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}"
        )
    return result


def _ip_batch(
    namespace: str | None, commands: Iterable[str], *, force: bool = False
) -> None:
    """Run several `ip` commands in one process (in a namespace, if given)."""
    argv = ["ip"]
    if namespace is not None:
        argv += ["-n", namespace]
    if force:
        argv.append("-force")
    _run([*argv, "-batch", "-"], input="\n".join(commands) + "\n")


def _list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    # Lines are "NAME" or "NAME (id: N)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _namespace_pids(namespace: str) -> set[int]:
    result = _run(["ip", "netns", "pids", namespace], check=False)
    return {int(tok) for tok in result.stdout.split() if tok.isdigit()}


def _pids_in(namespaces: Iterable[str]) -> set[int]:
    me = os.getpid()
    pids: set[int] = set()
    for ns in namespaces:
        pids |= _namespace_pids(ns)
    pids.discard(me)  # should someone run us inside a lab namespace
    return pids


def _kill(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _teardown(namespaces: Sequence[str], grace: float = 1.0) -> None:
    """Kill every process in these namespaces, then delete them."""
    if not namespaces:
        return
    pids = _pids_in(namespaces)
    if pids:
        _kill(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.02)
            pids = _pids_in(namespaces)
        _kill(pids, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.02)
            pids = _pids_in(namespaces)
    # -force: carry on past a namespace that is already gone.
    try:
        _ip_batch(None, [f"netns del {ns}" for ns in namespaces], force=True)
    except LabError:
        pass
    left = set(namespaces) & set(_list_namespaces())
    if left:
        raise LabError(f"could not delete namespaces {sorted(left)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            # A zombie has finished; its labs are stale.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cleanup_stale() -> list[str]:
    """Delete the namespaces (and kill the processes in them) of labs whose
    creator process is gone; return the namespaces deleted. Namespaces
    without the lab prefix, and labs of live processes, are left alone."""
    stale = [
        ns
        for ns in _list_namespaces()
        if (m := _STALE_RE.match(ns)) is not None and not _pid_alive(int(m.group(1)))
    ]
    _teardown(stale)
    return stale


_PROBE_RULES = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -i lo -p udp -j DNAT --to-destination 127.0.0.2
-A POSTROUTING -o lo -j MASQUERADE --random-fully
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -j ACCEPT
COMMIT
"""


@functools.cache
def lab_available() -> tuple[bool, str]:
    """(True, "") if this process can build labs, else (False, the reason).

    Checks root, the `ip` and `iptables-restore` commands, and that a
    namespace can be made and takes every kind of rule the routers use.
    """
    if os.geteuid() != 0:
        return False, "the NAT lab needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables-restore"):
        if shutil.which(tool) is None:
            return False, f"the NAT lab needs `{tool}`, which is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
    except (LabError, OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot create a network namespace: {e}"
    try:
        _run(["ip", "netns", "exec", probe, "iptables-restore"], input=_PROBE_RULES)
    except (LabError, OSError, subprocess.TimeoutExpired) as e:
        return False, f"iptables nat/conntrack rules fail in a namespace: {e}"
    finally:
        try:
            _teardown([probe])
        except LabError:
            pass
    return True, ""


# Labs not yet cleaned up, for atexit and SIGTERM.
_live: set[NatLab] = set()
_live_lock = threading.Lock()
_sequence = itertools.count()
_previous_sigterm: Callable[[int, types.FrameType | None], object] | int | None = None
_sigterm_installed = False


def _cleanup_live() -> None:
    with _live_lock:
        labs = list(_live)
    for lab in labs:
        try:
            lab.cleanup()
        except Exception:
            pass  # the others still deserve their clean-up


atexit.register(_cleanup_live)


def _on_sigterm(signum: int, frame: types.FrameType | None) -> None:
    _cleanup_live()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
        return
    # The default action: die of SIGTERM, as we would have without the lab.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm() -> None:
    global _previous_sigterm, _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        return  # whoever ignores SIGTERM will exit another way: atexit
    _previous_sigterm = previous
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True


def _router_rules(host: Host, wan: str, stateful_filter: bool) -> str:
    nat: list[str] = []
    if host.nat is NatType.FULL_CONE:
        nat += [
            f"-A PREROUTING -i {wan} -d {host.public_address} -p udp"
            f" -j DNAT --to-destination {host.address}",
            f"-A POSTROUTING -o {wan} -s {host.address}"
            f" -j SNAT --to-source {host.public_address}",
        ]
    elif host.nat is NatType.PORT_RESTRICTED:
        nat.append(f"-A POSTROUTING -o {wan} -j MASQUERADE")
    elif host.nat is NatType.SYMMETRIC:
        nat.append(f"-A POSTROUTING -o {wan} -j MASQUERADE --random-fully")
    filt: list[str] = []
    if stateful_filter:
        admit = "RELATED,ESTABLISHED"
        if host.nat is NatType.FULL_CONE:
            admit += ",DNAT"  # the cone: whatever the DNAT rule let in
        for chain in ("INPUT", "FORWARD"):
            filt += [
                f"-A {chain} -i {wan} -m conntrack --ctstate {admit} -j ACCEPT",
                f"-A {chain} -i {wan} -j DROP",
            ]
    return "\n".join(
        [
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            ":INPUT ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            ":POSTROUTING ACCEPT [0:0]",
            *nat,
            "COMMIT",
            "*filter",
            ":INPUT ACCEPT [0:0]",
            ":FORWARD ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            *filt,
            "COMMIT",
            "",
        ]
    )


class NatLab:
    """A seed and one host per side, each side behind its NAT type.

    Build it by entering it (``with`` or ``async with``); leaving it removes
    everything. ``stateful_filter=False`` leaves out the routers' CPE filter
    (see the module docstring); ``reap_stale=False`` skips ``cleanup_stale``.
    """

    def __init__(
        self,
        sides: Sequence[NatType],
        *,
        stateful_filter: bool = True,
        reap_stale: bool = True,
    ) -> None:
        if len(sides) > _MAX_SIDES:
            raise ValueError(f"at most {_MAX_SIDES} sides, got {len(sides)}")
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_sequence)}"
        self.stateful_filter = stateful_filter
        self._reap_stale = reap_stale
        self.internet = f"{self.prefix}-inet"
        self.seed = Host(
            name=f"{self.prefix}-seed",
            label="seed",
            address=SEED_ADDRESS,
            public_address=SEED_ADDRESS,
            nat=NatType.NONE,
        )
        self.hosts: list[Host] = []
        for i, nat in enumerate(sides):
            label = chr(ord("a") + i)
            public = f"{_PUBLIC_NET}{11 + i}"
            ns = f"{self.prefix}-{label}"
            if nat is NatType.NONE:
                host = Host(ns, label, public, public, nat)
            else:
                host = Host(ns, label, f"10.0.{i + 1}.2", public, nat, f"{ns}-nat")
            self.hosts.append(host)

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this lab."""
        names = [self.internet, self.seed.name]
        for host in self.hosts:
            names.append(host.name)
            if host.router is not None:
                names.append(host.router)
        return names

    def exec_argv(self, where: Host | str, argv: Sequence[str]) -> list[str]:
        """argv run inside a host's (or the named) namespace."""
        ns = where.name if isinstance(where, Host) else where
        return ["ip", "netns", "exec", ns, *argv]

    def run(
        self,
        where: Host | str,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv to completion in a namespace, capturing text output."""
        return _run(self.exec_argv(where, argv), input=input, check=check)

    # Building

    def start(self) -> None:
        """Build the lab (what entering it does); on failure, clean up and raise."""
        _install_sigterm()
        with _live_lock:
            _live.add(self)
        try:
            if self._reap_stale:
                cleanup_stale()
            self._build()
        except BaseException:
            self.cleanup()
            raise

    def _build(self) -> None:
        _ip_batch(None, [f"netns add {ns}" for ns in self.namespaces])
        inet = [
            "link set lo up",
            "link add br0 type bridge",
            "link set br0 up",
        ]
        # One bridge port per public interface; the far end goes straight into
        # its namespace, so no link ever exists in the root namespace.
        public: list[tuple[str, str]] = [(self.seed.name, "eth0")]
        for host in self.hosts:
            public.append(
                (host.name, "eth0") if host.router is None else (host.router, "wan")
            )
        for n, (ns, ifname) in enumerate(public):
            port = f"port{n}"
            inet += [
                f"link add {port} type veth peer name {ifname} netns {ns}",
                f"link set {port} master br0",
                f"link set {port} up",
            ]
        _ip_batch(self.internet, inet)
        prefix_len = PUBLIC_PREFIX_LEN
        self._up(self.seed.name, "eth0", f"{self.seed.address}/{prefix_len}")
        for i, host in enumerate(self.hosts):
            if host.router is None:
                self._up(host.name, "eth0", f"{host.address}/{prefix_len}")
                continue
            lan_gw = f"10.0.{i + 1}.1"
            _ip_batch(
                host.router,
                [
                    "link set lo up",
                    f"addr add {host.public_address}/{prefix_len} dev wan",
                    "link set wan up",
                    f"link add lan type veth peer name eth0 netns {host.name}",
                    f"addr add {lan_gw}/24 dev lan",
                    "link set lan up",
                ],
            )
            self._up(host.name, "eth0", f"{host.address}/24", gateway=lan_gw)
            _run(
                self.exec_argv(
                    host.router,
                    [
                        "sh",
                        "-c",
                        "sysctl -qw net.ipv4.ip_forward=1 && iptables-restore",
                    ],
                ),
                input=_router_rules(host, "wan", self.stateful_filter),
            )

    @staticmethod
    def _up(ns: str, ifname: str, cidr: str, gateway: str | None = None) -> None:
        commands = [
            "link set lo up",
            f"addr add {cidr} dev {ifname}",
            f"link set {ifname} up",
        ]
        if gateway is not None:
            commands.append(f"route add default via {gateway}")
        _ip_batch(ns, commands)

    # Tearing down

    def cleanup(self) -> None:
        """Kill every process in the lab's namespaces and delete them.

        Idempotent; finds the namespaces by the lab's prefix, so it also
        removes those of a half-built lab.
        """
        mine = [ns for ns in _list_namespaces() if ns.startswith(f"{self.prefix}-")]
        _teardown(mine)
        with _live_lock:
            _live.discard(self)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    async def __aenter__(self) -> Self:
        _install_sigterm()  # signal handlers are for the main thread only
        try:
            await trio.to_thread.run_sync(self.start)
        except BaseException:
            # Cancelled while the thread built: the thread finished, undo it.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.cleanup)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.cleanup)

    def __repr__(self) -> str:
        sides = ", ".join(h.nat.value for h in self.hosts)
        return f"NatLab({self.prefix}: {sides})"
