"""Mailbox: packed messages, variable sizes, both receive disciplines, messages to self."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from fxdisag.runtime.mailbox import byte_size, pack_bytes, unpack_bytes


def test_pack_unpack_round_trip_keeps_alignment():
    x = torch.randn(3, 5)
    w = torch.rand(3, 1, dtype=torch.float64)
    ids = torch.tensor([[7], [1], [3]])
    layout = [((3, 5), torch.float32), ((3, 1), torch.float64), ((3, 1), torch.int64)]
    buf = pack_bytes([x, w, ids])
    assert buf.numel() == byte_size(layout) == 64 + 24 + 24  # 60 bytes of x padded to 64
    a, b, c = unpack_bytes(buf, layout)
    assert torch.equal(a, x) and torch.equal(b, w) and torch.equal(c, ids)
    with pytest.raises(RuntimeError, match="does not match the expected layout"):
        unpack_bytes(buf, layout[:2])


def _exchange(rank: int, world: int, ordered: bool) -> list:
    import torch.distributed as dist

    from fxdisag.runtime.mailbox import Mailbox, Receive, byte_size, pack_bytes, unpack_bytes

    box = Mailbox(torch.device("cpu"), ordered=ordered)
    layout = lambda n: [((n, 4), torch.float32)]  # noqa: E731
    got = []
    if rank == 0:
        # Variable-size messages (with counts) to rank 1 and to itself, then fixed-size ones.
        for i, n in enumerate((3, 0, 5)):
            rows = torch.full((n, 4), float(10 * i))
            box.send([(1, 100 + 2 * i, pack_bytes([rows]), n), (0, 100 + 2 * i, pack_bytes([rows + 1]), n)])
        mine = [Receive(0, 100 + 2 * i, size_of=lambda n: byte_size(layout(n)), capacity=byte_size(layout(8)))
                for i in range(3)]
        box.post(mine)
        for r in mine:
            box.wait(r)
            got.append(unpack_bytes(r.payload, layout(r.header_value))[0].tolist())
        box.send([(1, 200, pack_bytes([torch.arange(6.0)]), None)])
    else:
        rs = [Receive(0, 100 + 2 * i, size_of=lambda n: byte_size(layout(n)), capacity=byte_size(layout(8)))
              for i in range(3)]
        fixed = Receive(0, 200, nbytes=byte_size([((6,), torch.float32)]))
        box.post(rs + [fixed])  # all posted before any arrives
        for r in rs:
            box.wait(r)
            got.append(unpack_bytes(r.payload, layout(r.header_value))[0].tolist())
        box.wait(fixed)
        got.append(unpack_bytes(fixed.payload, [((6,), torch.float32)])[0].tolist())
    box.drain()
    dist.barrier()
    return got


@pytest.mark.dist
@pytest.mark.parametrize("ordered", [False, True], ids=["tagged", "ordered"])
def test_variable_size_messages_arrive_whole_and_in_order(ordered):
    r0, r1 = run_distributed(_exchange, 2, ordered, timeout=60)
    assert r1[:3] == [[[0.0] * 4] * 3, [], [[20.0] * 4] * 5]
    assert r1[3] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert r0 == [[[1.0] * 4] * 3, [], [[21.0] * 4] * 5]  # messages to self
