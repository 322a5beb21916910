"""fjt's benchmarks, run by ``scripts/bench.py``: speed as ratios against baselines measured in the
same process (PyTorch on the same model and threads, copies of the same bytes, ``torch.save`` /
``torch.load`` of the same arrays, a float32 matmul). Outside the ``fjt`` package: nothing in
the library imports them. One module per group of rows (``train_steps``, ``gpt``,
``aggregation``, ``stream``, ``checkpoints``, ``sharded``), ``suite.run`` for all of them.

Needs PyTorch (the ``torch`` extra) for the baselines.
"""
