"""ClusterSpec: the hardware a plan is made for, from datasheets or measured in place.

Contract
--------
A :class:`ClusterSpec` is ``num_nodes`` identical nodes of ``devices_per_node``
identical devices. Every number is per device or per link and *per direction*:

* ``peak_flops[dtype]`` -- dense peak FLOP/s of one device for that dtype name;
* ``memory_bandwidth`` (B/s) and ``memory_capacity`` (bytes) of one device;
* ``intra_node_bandwidth`` -- B/s one device can send (and, at the same time,
  receive) to the other devices of its node;
* ``nics_per_node`` NICs of ``nic_bandwidth`` B/s each per direction, shared by the
  devices of a node; a rank numbered ``r`` lives on node ``r // devices_per_node``;
* ``intra_node_latency`` / ``inter_node_latency`` -- seconds per message;
* ``action_overhead`` -- fixed seconds every compute action pays on top of its roofline
  time (one stage forward or backward of one micro-batch: framework dispatch of the
  stage's graph, kernel launches, small-kernel inefficiency). 0 for the presets (see
  ``_preset``); ``measure()`` measures a proxy of it. JSON written before the field
  existed loads with 0;
* ``expert_action_overhead`` -- the same for expert actions (EF, EB) where it differs
  (``None``: ``action_overhead``). A calibration from a real profiling step
  (``fxdisag.planner.calibrate``) fits the two sides apart.

Ways to get one::

    ClusterSpec.parse("16x8xh800")            # nodes x devices-per-node x preset
    ClusterSpec.preset("a100", num_nodes=2)   # preset, 8 devices per node
    ClusterSpec.cpu(4, flops=50e9, bandwidth=0.12e9, action_overhead=1e-3)   # hand-made, one device per node
    ClusterSpec.measure()                     # online profiling of the running world

Preset numbers are public datasheet values (sources in ``_PRESETS``). Datasheet
interconnect figures such as "NVLink 400 GB/s" are bidirectional aggregates and are
halved here to get the per-direction value. Latencies are not on datasheets: the
presets use typical NCCL small-message latencies (3 us inside a node, 5 us across
nodes) and say so in ``notes``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field

import torch

__all__ = ["ClusterSpec", "PRESETS", "dtype_name"]

_GB = 1e9
_ASSUMED_LATENCY = "latencies are assumptions (typical NCCL small-message latency), not datasheet values"


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"bf16"`` -> ``"bfloat16"`` (the key of ``peak_flops``)."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    return aliases.get(dtype, dtype)


@dataclass
class ClusterSpec:
    name: str
    num_nodes: int
    devices_per_node: int
    peak_flops: dict[str, float]
    memory_bandwidth: float
    memory_capacity: float
    intra_node_bandwidth: float
    nics_per_node: int
    nic_bandwidth: float
    intra_node_latency: float
    inter_node_latency: float
    action_overhead: float = 0.0
    notes: list[str] = field(default_factory=list)
    expert_action_overhead: float | None = None

    def __post_init__(self) -> None:
        for attr in ("num_nodes", "devices_per_node", "nics_per_node"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ClusterSpec.{attr} must be an int >= 1, got {value!r}")
        for attr in ("memory_bandwidth", "memory_capacity", "intra_node_bandwidth", "nic_bandwidth"):
            value = getattr(self, attr)
            if not value > 0:
                raise ValueError(f"ClusterSpec.{attr} must be > 0 (math.inf for unlimited), got {value!r}")
        for attr in ("intra_node_latency", "inter_node_latency", "action_overhead"):
            value = getattr(self, attr)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"ClusterSpec.{attr} must be finite and >= 0 seconds, got {value!r}")
        e = self.expert_action_overhead
        if e is not None and not (e >= 0 and math.isfinite(e)):
            raise ValueError(f"ClusterSpec.expert_action_overhead must be None or finite and >= 0 seconds, got {e!r}")
        if not self.peak_flops or not all(v > 0 for v in self.peak_flops.values()):
            raise ValueError(f"ClusterSpec.peak_flops must map dtype names to FLOP/s > 0, got {self.peak_flops!r}")

    # ------------------------------------------------------------------ queries
    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside this {self.world_size}-device cluster")
        return rank // self.devices_per_node

    @property
    def expert_overhead(self) -> float:
        """Fixed seconds per expert action (EF, EB): ``expert_action_overhead`` or ``action_overhead``."""
        return self.action_overhead if self.expert_action_overhead is None else self.expert_action_overhead

    def peak(self, dtype: torch.dtype | str) -> float:
        key = dtype_name(dtype)
        if key not in self.peak_flops:
            raise ValueError(
                f"cluster {self.name!r} has no peak FLOP/s for dtype {key!r}; known: {sorted(self.peak_flops)}. "
                "Build the spec with that dtype in peak_flops."
            )
        return self.peak_flops[key]

    def describe(self) -> str:
        """The string form when this is a preset cluster, else a one-line summary."""
        overhead = f", {_fmt_seconds(self.action_overhead)} per compute action" if self.action_overhead else ""
        if self.name in PRESETS:
            return f"{self.num_nodes}x{self.devices_per_node}x{self.name}" + (f" ({overhead[2:]})" if overhead else "")
        return f"{self.name} ({self.num_nodes} nodes x {self.devices_per_node} devices{overhead})"

    def __str__(self) -> str:
        flops = ", ".join(f"{k} {v / 1e12:.4g} TFLOP/s" for k, v in sorted(self.peak_flops.items()))
        lines = [
            f"cluster {self.describe()}: {self.world_size} devices",
            f"  device: {flops}; memory {self.memory_capacity / _GB:.4g} GB at {self.memory_bandwidth / _GB:.4g} GB/s",
            f"  intra-node: {self.intra_node_bandwidth / _GB:.4g} GB/s per device per direction, "
            f"latency {self.intra_node_latency * 1e6:.3g} us",
            f"  inter-node: {self.nics_per_node} NICs x {self.nic_bandwidth / _GB:.4g} GB/s per node per direction, "
            f"latency {self.inter_node_latency * 1e6:.3g} us",
            f"  overhead per compute action (F, B, EF, EB of one micro-batch): {_fmt_seconds(self.action_overhead)}"
            + ("" if self.expert_action_overhead is None
               else f" (EF, EB: {_fmt_seconds(self.expert_action_overhead)})"),
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ClusterSpec":
        """Inverse of :meth:`to_dict`; a dict without ``action_overhead`` (written before the
        field existed) loads with 0."""
        return cls(**data)

    def replace(self, **changes) -> "ClusterSpec":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def preset(cls, name: str, *, num_nodes: int = 1, devices_per_node: int | None = None) -> "ClusterSpec":
        key = name.strip().lower()
        if key not in PRESETS:
            raise ValueError(f"unknown cluster preset {name!r}; presets: {', '.join(PRESETS)}")
        spec = PRESETS[key]
        return dataclasses.replace(
            spec,
            num_nodes=num_nodes,
            devices_per_node=devices_per_node or spec.devices_per_node,
            peak_flops=dict(spec.peak_flops),
            notes=list(spec.notes),
        )

    @classmethod
    def parse(cls, text: str) -> "ClusterSpec":
        """``"16x8xh800"`` -> 16 nodes of 8 H800s (``nodes x devices-per-node x preset``)."""
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*([A-Za-z0-9_\-]+)\s*", text)
        if not match:
            raise ValueError(
                f"cluster {text!r} is not of the form <nodes>x<devices per node>x<preset>, e.g. '16x8xh800' "
                f"(presets: {', '.join(PRESETS)})"
            )
        nodes, per_node, name = int(match[1]), int(match[2]), match[3]
        if nodes < 1 or per_node < 1:
            raise ValueError(f"cluster {text!r}: node and device counts must be >= 1")
        return cls.preset(name, num_nodes=nodes, devices_per_node=per_node)

    @classmethod
    def cpu(
        cls,
        world_size: int,
        *,
        flops: float,
        bandwidth: float,
        latency: float = 0.0,
        memory_bandwidth: float = math.inf,
        memory_capacity: float = math.inf,
        dtype: torch.dtype | str = torch.float32,
        action_overhead: float = 0.0,
    ) -> "ClusterSpec":
        """A hand-made cluster of ``world_size`` single-device nodes (one process per rank).

        ``flops``: FLOP/s per rank for ``dtype``; ``bandwidth``: B/s per direction of each
        rank's link; ``latency`` and ``action_overhead`` (per compute action) in seconds.
        Memory is unlimited unless given.
        """
        return cls(
            name="cpu",
            num_nodes=world_size,
            devices_per_node=1,
            peak_flops={dtype_name(dtype): float(flops)},
            memory_bandwidth=float(memory_bandwidth),
            memory_capacity=float(memory_capacity),
            intra_node_bandwidth=float(bandwidth),
            nics_per_node=1,
            nic_bandwidth=float(bandwidth),
            intra_node_latency=float(latency),
            inter_node_latency=float(latency),
            action_overhead=float(action_overhead),
            notes=["hand-made: one device per node, one link per device"],
        )

    @classmethod
    def measure(
        cls,
        group=None,
        *,
        dtype: torch.dtype | None = None,
        matmul_size: int = 1024,
        message_bytes: int = 16 << 20,
        repeats: int = 5,
        overhead_ops: int = 50,
    ) -> "ClusterSpec":
        """Online profiling: a spec for the world this process runs in, from measurements.

        * FLOP/s: an ``matmul_size``-square matmul in ``dtype`` (float32 on CPU, bfloat16 on
          CUDA by default) on this process's device; the median of ``repeats`` timings.
        * memory bandwidth: a copy of a 64 MB tensor (bytes read + written per second).
        * action overhead: the median time of the forward + backward of a ``torch.fx``
          GraphModule of ``overhead_ops`` elementwise ops on a 4 x 8 tensor (about 0.3 ms
          for 50 ops on this project's 2-core CPU host). The work is negligible, so the time is
          what every stage action pays regardless of its size: Python dispatch of the
          graph's ops and autograd's bookkeeping. It is a *proxy*: a real stage has its
          own op count, and the runtime's per-action Python (mailbox, worker loop) and the
          inefficiency of small matmuls come on top, so it is a lower bound of the true
          per-action cost (benchmarks/RESULTS.md infers about 1 ms per action on CPU).
        * links, when ``torch.distributed`` is initialised: every rank exchanges messages
          with its ring neighbours (receives posted before sends, as gloo needs for full
          duplex); latency from 8-byte messages, bandwidth from ``message_bytes`` ones.
          FLOP/s and bandwidth are the minimum over ranks, latency and action overhead the maximum, so the
          spec is safe for every rank. Without torch.distributed the world is this one
          process and the links are reported unmeasured (infinite bandwidth, zero latency).

        Each rank is its own "node" with one NIC (1 device per process); CPU runs say so
        in ``notes``. Call it on every rank of ``group`` (a collective).
        """
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        flops = _measure_matmul(device, dtype, matmul_size, repeats)
        mem_bw = _measure_copy(device, repeats)
        capacity = _device_memory(device)
        overhead = _measure_action_overhead(device, overhead_ops, max(repeats, 20))
        notes = [f"measured on {device.type}: {matmul_size}^2 {dtype_name(dtype)} matmul, 64 MB copy",
                 f"action overhead: forward + backward of a {overhead_ops}-op torch.fx graph on tiny tensors "
                 "(a proxy, lower bound of a real stage's fixed cost)"]
        if device.type == "cpu":
            notes.append("CPU processes: each rank is a 'device' sharing the host's cores and memory")
        world = 1
        bandwidth, latency = math.inf, 0.0
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size(group)
            if world > 1:
                latency, bandwidth = _measure_ring(group, device, message_bytes, repeats)
                stats = torch.tensor([flops, mem_bw, bandwidth, -latency, capacity, -overhead], dtype=torch.float64)
                if device.type == "cuda":
                    stats = stats.to(device)
                dist.all_reduce(stats, op=dist.ReduceOp.MIN, group=group)
                flops, mem_bw, bandwidth, latency, capacity, overhead = stats.tolist()
                latency, overhead = -latency, -overhead
                notes.append(f"links: ring point-to-point over {dist.get_backend(group)}, {message_bytes} B messages")
        if world == 1:
            notes.append("links not measured: torch.distributed is not initialised (or world size 1)")
        return cls(
            name=f"measured-{device.type}",
            num_nodes=world,
            devices_per_node=1,
            peak_flops={dtype_name(dtype): flops},
            memory_bandwidth=mem_bw,
            memory_capacity=capacity,
            intra_node_bandwidth=bandwidth,
            nics_per_node=1,
            nic_bandwidth=bandwidth,
            intra_node_latency=latency,
            inter_node_latency=latency,
            action_overhead=overhead,
            notes=notes,
        )


# ---------------------------------------------------------------------- measurement helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (first call allocates, picks kernels)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure_matmul(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = _median_time(lambda: torch.mm(a, b), device, repeats)
    return 2.0 * n**3 / seconds


def _measure_copy(device: torch.device, repeats: int) -> float:
    src = torch.empty(16 << 20, dtype=torch.float32, device=device).fill_(1.0)  # 64 MB
    dst = torch.empty_like(src)
    seconds = _median_time(lambda: dst.copy_(src), device, repeats)
    return 2.0 * src.numel() * src.element_size() / seconds


def _measure_action_overhead(device: torch.device, num_ops: int, repeats: int) -> float:
    """Median seconds of forward + backward of an FX graph of ``num_ops`` elementwise ops on
    a 4 x 8 tensor (see :meth:`ClusterSpec.measure`)."""
    import torch.fx as fx

    if num_ops < 1:
        raise ValueError(f"ClusterSpec.measure: overhead_ops must be >= 1, got {num_ops}")
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    h = graph.call_function(torch.mul, (x, w))
    binary = (torch.add, torch.mul, torch.sub)
    for i in range(num_ops - 1):
        # a tanh now and then keeps the values bounded and the op mix stage-like
        h = graph.call_function(torch.tanh, (h,)) if i % 5 == 4 else graph.call_function(binary[i % 3], (h, w))
    graph.output(graph.call_function(torch.sum, (h,)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    x = torch.randn(4, 8, device=device)
    w = torch.randn(4, 8, device=device, requires_grad=True)

    def run() -> None:
        gm(x, w).backward()
        w.grad = None

    return _median_time(run, device, repeats)


def _fmt_seconds(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _device_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # Processes of one host share its memory.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return float(total) / max(local, 1)


def _measure_ring(group, device: torch.device, message_bytes: int, repeats: int) -> tuple[float, float]:
    import torch.distributed as dist

    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    nxt, prv = ranks[(rank + 1) % world], ranks[(rank - 1) % world]

    def exchange(numel: int):
        send = torch.ones(numel, dtype=torch.uint8, device=device)
        recv = torch.empty(numel, dtype=torch.uint8, device=device)

        def run():
            # Receive first: gloo runs a pair half-duplex when the send is posted first.
            r = dist.irecv(recv, src=prv, group=group)
            s = dist.isend(send, dst=nxt, group=group)
            r.wait()
            s.wait()

        return run

    dist.barrier(group=group)
    latency = _median_time(exchange(8), device, max(repeats, 10))
    dist.barrier(group=group)
    big = _median_time(exchange(message_bytes), device, repeats)
    # Subtract the latency, but never more than half the big exchange: on loopback the two
    # timings are close and noisy, and an unbounded correction gave 1e18 B/s once.
    bandwidth = message_bytes / max(big - min(latency, 0.5 * big), 1e-12)
    return latency, bandwidth


# ---------------------------------------------------------------------- presets


def _preset(name, per_node, flops, mem_bw, capacity, intra, nics, nic_bw, source) -> ClusterSpec:
    # action_overhead = 0: on these GPUs a stage action launches its kernels asynchronously, so
    # the host's dispatch (tens of us per stage) overlaps the previous action's kernels, and
    # the model's micro-batches (thousands of tokens) keep kernels far above launch latency
    # (~5 us). No datasheet gives a figure; measure() on the cluster gives one when it matters.
    return ClusterSpec(
        name=name,
        num_nodes=1,
        devices_per_node=per_node,
        peak_flops=flops,
        memory_bandwidth=mem_bw,
        memory_capacity=capacity,
        intra_node_bandwidth=intra,
        nics_per_node=nics,
        nic_bandwidth=nic_bw,
        intra_node_latency=3e-6,
        inter_node_latency=5e-6,
        notes=[source, _ASSUMED_LATENCY],
    )


_GBIT = 1e9 / 8
PRESETS: dict[str, ClusterSpec] = {
    # NVIDIA H800 SXM5: 989.5 TFLOP/s bf16/fp16 dense, 67 TFLOP/s fp32, 80 GB HBM3 at 3.35 TB/s,
    # NVLink 400 GB/s bidirectional; 8 x 400 Gb/s InfiniBand NICs per 8-GPU node.
    "h800": _preset(
        "h800", 8, {"bfloat16": 989.5e12, "float16": 989.5e12, "float32": 67e12},
        3.35e12, 80 * _GB, 200 * _GB, 8, 400 * _GBIT,
        "H800 SXM5 datasheet; NVLink 400 GB/s bidirectional -> 200 GB/s per direction",
    ),
    # NVIDIA H100 SXM5 (DGX H100): same compute and HBM as H800, NVLink 900 GB/s bidirectional,
    # 8 x 400 Gb/s ConnectX-7 per node.
    "h100": _preset(
        "h100", 8, {"bfloat16": 989.5e12, "float16": 989.5e12, "float32": 67e12},
        3.35e12, 80 * _GB, 450 * _GB, 8, 400 * _GBIT,
        "H100 SXM5 / DGX H100 datasheet; NVLink 900 GB/s bidirectional -> 450 GB/s per direction",
    ),
    # NVIDIA A100 SXM4 80 GB (DGX A100): 312 TFLOP/s bf16 dense, 19.5 TFLOP/s fp32, 2.039 TB/s,
    # NVLink 600 GB/s bidirectional, 8 x 200 Gb/s HDR InfiniBand per node.
    "a100": _preset(
        "a100", 8, {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
        2.039e12, 80 * _GB, 300 * _GB, 8, 200 * _GBIT,
        "A100 SXM4 80GB / DGX A100 datasheet; NVLink 600 GB/s bidirectional -> 300 GB/s per direction",
    ),
    # AMD MI250X, one device = one GCD (what PyTorch sees): half the package's 383 TFLOP/s bf16,
    # 47.9 TFLOP/s fp32 vector, 128 GB HBM2e at 3.2768 TB/s; a node (Frontier / HPE EX235a) holds
    # 4 packages = 8 GCDs and 4 x 200 Gb/s Slingshot NICs; one Infinity Fabric link between GCDs
    # of different packages is 100 GB/s bidirectional.
    "mi250x": _preset(
        "mi250x", 8, {"bfloat16": 191.5e12, "float16": 191.5e12, "float32": 23.95e12},
        1.6384e12, 64 * _GB, 50 * _GB, 4, 200 * _GBIT,
        "MI250X datasheet, per GCD (half a package); Infinity Fabric 100 GB/s bidirectional link "
        "-> 50 GB/s per direction between GCDs",
    ),
}
