"""The extension API: how to teach hf_bdgauge a new model family or a new transportable object.

Everything a user of the library calls is at the top level (:mod:`hf_bdgauge`); this module holds
what someone extending it needs, in one place: each name is the object of the module that defines
it (re-exported here, not wrapped), so the documentation of each lives with its code.

Adding a model family
---------------------
A family is data: an :class:`ArchitectureSpec` says, for each parameter name (a regular expression
matched as a suffix), its :class:`Role` — it *reads* the residual (``W ↦ W·Gᵀ``), *writes* it
(``W ↦ G·W``), is a residual norm *gain* (``g ↦ P·g``) or is untouched — and, where the layout is
not ``nn.Linear``'s ``[out, in]``, the residual axis; besides, where the decoder blocks, the token
embedding and the output projection live, the config keys of the width and depth, where each norm
gain sits (pre-norm, post-norm, stream) and the normalisation (``"rmsnorm"`` admits every signed
permutation, ``"layernorm"`` only permutations and the global flip)::

    from hf_bdgauge.extend import register_architecture, spec_for_model

    register_architecture({"name": "mymodel", "model_types": ["mymodel"], ...})  # the JSON schema
    spec = spec_for_model(model)  # the spec transformers' config.model_type selects

The built-in families are the JSON files of ``hf_bdgauge/architectures/`` (adding one there is the
same as :func:`register_architecture` at run time); :func:`available_architectures` lists them.
:func:`check_gauge_allowed` is the one check that a group element is a symmetry of a family.
Nothing else in the library names a family's modules.

Adding a transportable object
-----------------------------
An object moves tensor by tensor: give each tensor a :class:`TensorRule` (its role and residual
axis), collect them in a :class:`TransformPlan` (``TransformPlan.for_tensors``), let the plan admit
the gauge (``plan.admit(gauge)``: the element to apply, after the family's and the fit's checks)
and move each tensor with :func:`transform`; :func:`transport_record` is the provenance block
written beside the result. To make it a ``bdgauge transport <kind>`` command, register a
:class:`TransportKind` (its CLI word, help, source description and ``"module:function"`` runner)
with :func:`register_transport`.
"""

from __future__ import annotations

from .plan import TransformPlan
from .record import transport_record
from .roles import (
    ArchitectureSpec,
    available_architectures,
    check_gauge_allowed,
    register_architecture,
    spec_for_model,
)
from .rules import Role, TensorRule, transform
from .transport.registry import TransportKind, register_transport

__all__ = [
    # families
    "ArchitectureSpec",
    "register_architecture",
    "available_architectures",
    "spec_for_model",
    "check_gauge_allowed",
    # tensors and objects
    "Role",
    "TensorRule",
    "transform",
    "TransformPlan",
    "transport_record",
    # command-line kinds
    "TransportKind",
    "register_transport",
]
