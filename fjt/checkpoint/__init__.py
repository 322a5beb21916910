"""Orbax checkpoints: save and load any pytree, with PyTorch-style key reports.

``save(path, tree)`` is ``torch.save(model.state_dict(), path)``;
``load(path, target, strict=False)`` is ``load_state_dict(strict=False)``, but the
key differences are computed from Orbax metadata before any array is read, and
a shape mismatch is always an error unless the path is explicitly skipped.

Every finished checkpoint gets ``fjt_manifest.json``: the size and CRC-32 of each
of its files. Orbax alone reads a truncated or bit-flipped data file without
complaint; every restore checks the manifest (the CRC-32s before Orbax's read),
so a damaged file is named and nothing read from it is returned. A checkpoint
without a manifest is never sealed after the fact: it is reported as unverified.

The modules, re-exported flat here: ``io`` (locate, save, load, variables), ``report``
(``LoadReport``, ``compare``), ``integrity`` (CRC-32s and the manifest), ``run``
(``RunCheckpointer``, a training run's checkpoints) and ``errors``.
"""

from fjt.checkpoint import errors, integrity, io, report, run
from fjt.checkpoint.errors import CheckpointError, CheckpointMismatchError
from fjt.checkpoint.integrity import (MANIFEST, array_specs, crc32_combine, verify, verify_or_say,
                                      write_manifest)
from fjt.checkpoint.io import (ITEM, VARIABLES, iter_variables, load, load_tree, load_variables,
                               resolve, save,
                               saved_mesh, saved_shapes, step_dirs, variables_shapes)
from fjt.checkpoint.io import _handler, _restore  # noqa: F401  For the benchmarks, as before.
from fjt.checkpoint.report import LoadReport, compare, shape_dtype
from fjt.checkpoint.run import RunCheckpointer

__all__ = [
    "CheckpointError", "CheckpointMismatchError", "ITEM", "LoadReport", "MANIFEST",
    "RunCheckpointer", "VARIABLES", "array_specs", "compare", "crc32_combine", "iter_variables",
    "load", "load_tree", "load_variables", "resolve", "save", "saved_mesh", "saved_shapes", "shape_dtype",
    "step_dirs", "variables_shapes", "verify", "verify_or_say", "write_manifest",
]
