"""The ``bdgauge`` command line.

Verbs (``bdgauge VERB --help`` for each): ``estimate``, ``stats``, ``compose``, ``trace``, ``diff``,
``apply``, ``transport <kind>`` (one sub-verb per registered transportable object: adapter, sae, steering,
optimizer, probe, indices), ``push``, ``show``, ``audit``, ``demo``. Every model, gauge and
object argument takes a local path or a Hub id, pinned as ``repo@revision``. Writers refuse an
existing destination unless ``--overwrite``. Exit codes (docs/exit-codes.md): 0 done (a question —
estimate, trace, diff, compose — answered "related"), 1 done, answered "no evidence of a relation",
2 usage error, 3 refused or failed (too little data to test, bad input, a Hub failure; one line
says what).

The command line is a thin layer over the Python API: every verb calls the function of the same
name (:func:`~hf_bdgauge.estimate.estimate_gauge` — for activations its two steps
:func:`~hf_bdgauge.estimate.capture_pair` and :func:`~hf_bdgauge.estimate.gauge_from_capture`, so
the statistics can be saved between them —, :func:`~hf_bdgauge.apply_gauge_to_checkpoint`, each
registered transport kind's run in :mod:`.transport_kinds`, …).

Under a launcher (``torchrun``, ``accelerate launch``: ``WORLD_SIZE`` > 1) the verbs that can
split their work (``estimate``, ``stats``, ``compose``, ``trace``, ``diff``, ``apply``) join the
process group (:func:`~hf_bdgauge.distributed.init_from_env`, ``--dist-timeout``): activation
captures split the batches and all-reduce the sums, ``--method weights`` and data-free ``trace``
split the tensors, ``apply`` splits the checkpoint's shards into one shared temporary directory;
rank 0 alone prints and writes (``apply``: renames), the other ranks exit with the same
code without writing, and any rank's failure makes every rank exit non-zero. What does not
split (``--from-stats``, every other verb) runs on rank 0 only.

Modules: :mod:`.main` (the parser and the run of a verb), :mod:`.estimate_verbs`,
:mod:`.gauge_verbs`, :mod:`.demo_verbs`, :mod:`.transport_verbs` and :mod:`.transport_kinds` (the
verbs, each with its options), :mod:`.answers` (a question's answer), :mod:`.common` (argument
readers), :mod:`.flags` (the parser class and shared flags), :mod:`.option_flags` (the flags of
the option sets, :mod:`hf_bdgauge.options`), :mod:`.output` (printing, ``-q``, ``--json``). Only
light modules are imported at start-up: ``bdgauge --help`` imports no torch.
"""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
