"""How compiled training graphs treat this package's custom ops when they choose what to recompute.

``--act_budget`` < 1 makes torch's partitioner pick, by a knapsack over estimated runtimes, which
forward nodes to recompute in backward. Its default estimate counts FLOPs of matmuls and attention
only: an opaque custom op counts as 1 FLOP, i.e. free to recompute. For fla's WKV forward (~0.6 ms
per 1.6B layer on an H100, (1, T, H, 64) float32 intra-chunk scores saved) that is wrong: measured
with the WKV as custom ops, 1.6B stage 2, ``--act_budget 0.5``, the partitioner recomputed every
layer's WKV forward and ln_x + gate in backward (+14.7 ms of kernels per step, 10 GiB less peak).

``KeepOutputs`` is a joint-graph pass (inductor's ``joint_custom_pre_pass``, run before the
partition) that marks the forward nodes of the named ops MUST_SAVE, as selective activation
checkpointing would: their outputs are kept, and the knapsack works on the other nodes.

Its ``uuid`` is also where the compiled graphs' cache key learns the custom ops' definitions: inductor's
and AOTAutograd's caches key a graph by its nodes, where a custom op is only its name; its autograd
formula and schema are not hashed. A graph compiled against another definition of an op of the same
name (an older or newer visualrwkv) was found in the cache and called the op's backward with the
wrong arguments (H100, r56: ``wkv6_fla_packed_bwd() Expected a value of type 'Tensor' for argument
'A' but instead found type 'list'``). The uuid hashes the source of the modules that define the ops.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
from typing import Iterable, Tuple

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy

__all__ = ["KeepOutputs", "KERNEL_FORWARD_OPS"]

# The forward custom ops whose outputs training keeps (ops/wkv6.py, ops/norm_gate.py).
KERNEL_FORWARD_OPS = ("visualrwkv::wkv6_fla_packed_fwd", "visualrwkv::wkv6_fla_packed_keep_fwd",
                      "visualrwkv::norm_gate_fwd")

# The modules whose code defines the custom ops that compiled blocks call (names, schemas, fakes,
# autograd formulas, the kernels they launch).
OP_DEFINING_MODULES = ("visualrwkv.ops.wkv6", "visualrwkv.ops.fla_varlen", "visualrwkv.ops.norm_gate",
                       "visualrwkv.ops.maa_mix", "visualrwkv.ops._maa_mix_kernels", "visualrwkv.ops.partition")


@functools.lru_cache(maxsize=None)
def definitions_digest(modules: Tuple[str, ...] = OP_DEFINING_MODULES) -> str:
    """sha256 over the named modules' source files (read, not imported: no kernel library needed).
    A module without a source file (a frozen install) contributes its name only."""
    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        h.update(name.encode() + b"\0")
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            with open(spec.origin, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


class KeepOutputs(CustomGraphPass):
    """Mark the joint graph's nodes of the named custom ops (``namespace::name``) MUST_SAVE."""

    def __init__(self, op_names: Iterable[str] = KERNEL_FORWARD_OPS):
        self.op_names: Tuple[str, ...] = tuple(sorted(op_names))

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                    and node.target.name() in self.op_names:
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE

    # Equal passes give equal compile options, so dynamo reuses one block's graphs for every layer
    # (torch.compile wrappers with unequal options do not share cache entries).
    def __eq__(self, other) -> bool:
        return isinstance(other, KeepOutputs) and other.op_names == self.op_names

    def __hash__(self) -> int:
        return hash(self.op_names)

    def uuid(self) -> bytes:
        # Part of inductor's and AOTAutograd's cache keys: graphs compiled with another op list, or
        # against other definitions of the ops (module docstring), do not match.
        return hashlib.sha256(("KeepOutputs/2:" + ",".join(self.op_names) + ":"
                               + definitions_digest()).encode()).digest()
