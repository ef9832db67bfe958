"""Graph and plan dumps for debugging.

* ``region_table(captured)``: one row per region -- node count, parameter count and bytes,
  an example output shape.
* ``tagged_code(gm)``: the graph's Python code with each line prefixed by its region tag.
* ``maybe_dump_graph(name, gm)``: when the environment variable ``FXDISAG_DUMP_DIR`` is
  set, writes ``<dir>/<NNN>_<name>.py`` (tagged code) and ``.txt`` (the readable graph).
  Every pass that produces a graph calls it, so one variable shows every intermediate
  graph of a run: captured, split, per-rank.
* ``write_svg(gm, path)``: the graph drawn with graphviz (pydot), colored by region.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.fx as fx

__all__ = ["DUMP_ENV", "maybe_dump_graph", "maybe_dump_text", "region_table", "tagged_code", "write_svg"]

DUMP_ENV = "FXDISAG_DUMP_DIR"
_counter = itertools.count()

_COLORS = {
    "embed": "#c6dbef",
    "attn": "#9ecae1",
    "router": "#fdd0a2",
    "experts": "#fd8d3c",
    "shared_experts": "#fdae6b",
    "combine": "#fee6ce",
    "dense_mlp": "#a1d99b",
    "norm": "#e5e5e5",
    "head": "#bcbddc",
    "loss": "#9e9ac8",
}


def _tag(node: fx.Node) -> str:
    tag = node.meta.get("fxdisag_region")
    return str(tag) if tag is not None else "?"


def _params_of(gm: fx.GraphModule, node: fx.Node) -> list[torch.Tensor]:
    if node.op == "call_module":
        return list(gm.get_submodule(node.target).parameters())
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        return [obj] if isinstance(obj, torch.nn.Parameter) else []
    return []


def _shape_of(node: fx.Node) -> str:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    if val is None:
        return ""
    if isinstance(val, torch.Tensor) or hasattr(val, "shape"):
        return "x".join(str(d) for d in val.shape) or "scalar"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(_shape_of_value(v) for v in val) + ")"
    return ""


def _shape_of_value(v) -> str:
    return ("x".join(str(d) for d in v.shape) or "scalar") if hasattr(v, "shape") else type(v).__name__


def region_table(captured) -> str:
    """Per-region summary of a CapturedModel (or any tagged GraphModule)."""
    gm = getattr(captured, "graph_module", captured)
    rows: OrderedDict[str, dict] = OrderedDict()
    seen_params: set[int] = set()
    for node in gm.graph.nodes:
        tag = _tag(node)
        row = rows.setdefault(tag, {"nodes": 0, "params": 0, "bytes": 0, "shape": ""})
        row["nodes"] += 1
        for p in _params_of(gm, node):
            if id(p) in seen_params:
                continue
            seen_params.add(id(p))
            row["params"] += p.numel()
            row["bytes"] += p.numel() * p.element_size()
        shape = _shape_of(node)
        if shape and node.op != "get_attr":
            row["shape"] = shape  # the region's last value: what it hands on
    header = f"{'region':<20}{'nodes':>7}{'params':>18}{'bytes':>12}  example output"
    lines = [header, "-" * len(header)]
    for tag, row in rows.items():
        lines.append(
            f"{tag:<20}{row['nodes']:>7}{row['params']:>18,}{_human(row['bytes']):>12}  {row['shape']}".rstrip()
        )
    total_p = sum(r["params"] for r in rows.values())
    total_b = sum(r["bytes"] for r in rows.values())
    lines.append("-" * len(header))
    lines.append(f"{'total':<20}{sum(r['nodes'] for r in rows.values()):>7}{total_p:>18,}{_human(total_b):>12}")
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def tagged_code(gm: fx.GraphModule) -> str:
    """The graph, one node per line, prefixed by region tag (readable in a diff)."""
    lines = []
    for node in gm.graph.nodes:
        lines.append(f"{_tag(node):<18} {node.format_node()}")
    return "\n".join(lines)


def _dump_stem(name: str) -> Path | None:
    """``$FXDISAG_DUMP_DIR/[rankR_]NNN_name`` (numbered in creation order), or None when unset."""
    root = os.environ.get(DUMP_ENV)
    if not root:
        return None
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{next(_counter):03d}_{name}"
    if "RANK" in os.environ:
        stem = f"rank{os.environ['RANK']}_{stem}"
    return out / stem


def maybe_dump_graph(name: str, gm: fx.GraphModule) -> Path | None:
    """Write ``gm`` (tagged text and Python code) under $FXDISAG_DUMP_DIR when set."""
    stem = _dump_stem(name)
    if stem is None:
        return None
    stem.with_suffix(".txt").write_text(tagged_code(gm) + "\n")
    stem.with_suffix(".py").write_text(gm.code)
    return stem.with_suffix(".txt")


def maybe_dump_text(name: str, text: str) -> Path | None:
    """Write ``text`` (a schedule grid, a plan) under $FXDISAG_DUMP_DIR when it is set."""
    stem = _dump_stem(name)
    if stem is None:
        return None
    stem.with_suffix(".txt").write_text(text + "\n")
    return stem.with_suffix(".txt")


def write_svg(gm: fx.GraphModule, path: str | os.PathLike) -> None:
    """Draw ``gm`` with graphviz, each node colored by region. Needs pydot and graphviz."""
    try:
        import pydot
    except ImportError as exc:
        raise ImportError(
            "--svg needs the pydot package and the graphviz 'dot' program: "
            "pip install 'fxdisag[dot]' (or pip install pydot) and apt-get install graphviz"
        ) from exc
    graph = pydot.Dot("fxdisag", graph_type="digraph", rankdir="TB")
    for node in gm.graph.nodes:
        tag = node.meta.get("fxdisag_region")
        color = _COLORS.get(getattr(tag, "kind", ""), "#ffffff")
        label = f"{node.name}\\n{node.op}: {str(node.target)[:40]}\\n[{_tag(node)}]"
        graph.add_node(pydot.Node(node.name, label=label, style="filled", fillcolor=color, shape="box"))
    for node in gm.graph.nodes:
        for user in node.users:
            graph.add_edge(pydot.Edge(node.name, user.name))
    try:
        graph.write_svg(str(path))
    except FileNotFoundError as exc:
        raise RuntimeError("graphviz's 'dot' program was not found: apt-get install graphviz") from exc
