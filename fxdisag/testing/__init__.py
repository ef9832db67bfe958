"""Fixtures and tooling around fxdisag, not on its data path.

* ``models``: tiny random-weight models of every supported family and named full-size
  configs on the meta device (tests, the demo, ``python -m fxdisag plan --model``);
* ``throttle``: an in-process link throttle that paces ``torch.distributed`` sends to
  emulate a slow network (benchmarks and the demo install it; the library never does).
"""
