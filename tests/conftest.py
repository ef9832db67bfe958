import os
import sys

# Multi-process tests import the harness as a top-level module.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
