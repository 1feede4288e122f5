"""The option sets of estimation, as validated, frozen dataclasses.

Three sets recur across :func:`~hf_bdgauge.estimate.estimate_gauge`, ``capture_pair``,
``gauge_from_capture``, :func:`~hf_bdgauge.estimate.trace` / ``diff`` and the ``bdgauge`` verbs
``estimate``, ``stats``, ``trace`` and ``diff``:

* :class:`CaptureOptions`: what an activation capture reads (tokenizer, layers, batches, dtype,
  device map) and how the layers are pooled;
* :class:`WeightOptions`: how the data-free ``method="weights"`` compares the checkpoints;
* :class:`CalibrationOptions`: how the p-value is calibrated (draws, seed, reference null, level)
  and the tolerance of the identity verdict.

Every field carries ``metadata["help"]`` (the CLI's flags are generated from the fields and read
their help there; ``metadata["flag"]`` names a flag whose name is not the field's, ``None`` a field
with no flag of its own) and is checked on construction: a bad value raises
:class:`~hf_bdgauge.errors.EstimationError` naming the field and what is allowed. ``changed()``
gives the fields that differ from their defaults: an estimator refuses, by :func:`refuse_unused`,
an option it would not use. This module imports no torch (a dtype may be given by name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar

from .errors import EstimationError, Words

__all__ = [
    "CALIBRATION_DRAWS",
    "DTYPES",
    "LEVEL",
    "POOLINGS",
    "ROTATIONS",
    "TENSOR_WEIGHTINGS",
    "CalibrationOptions",
    "CaptureOptions",
    "WeightOptions",
    "flag_name",
    "refuse_unused",
]

#: the documented level: ``p_value <= LEVEL`` means "a signed permutation relates the charts"
LEVEL = 0.01
#: random rotations of the calibrated p-value's fitted null (independent of ``null_draws``)
CALIBRATION_DRAWS = 64
#: the laws of the calibration's random rotations (:mod:`hf_bdgauge.estimate.rotations`)
ROTATIONS = ("structured", "haar")
#: the dtypes a dtype option may name (``torch.<name>``)
DTYPES = ("float32", "bfloat16", "float16", "float64")
#: how per-layer correlations are pooled before one assignment (:mod:`hf_bdgauge.estimate.matching`)
POOLINGS = ("mean_abs", "mean_signed", "sum")
#: how each tensor's signature is scaled in the weights method (:mod:`hf_bdgauge.estimate.signatures`)
TENSOR_WEIGHTINGS = ("equal", "raw")


def _opt(default: Any, help: str, *, flag: str | None | bool = True, **cli: Any) -> Any:
    """A field with its help; ``flag``: ``True`` (the flag is the field's name), a flag name, or
    ``None`` (no flag of its own); ``cli``: how the flag reads its value (``type``: ``int``,
    ``float`` or ``str``; ``choices``; ``nargs``), by default from the default's type."""
    meta: dict[str, Any] = {"help": help, **cli}
    if flag is not True:
        meta["flag"] = flag
    return field(default=default, metadata=meta)


def flag_name(f: Any) -> str | None:
    """The CLI flag of the option field ``f`` (a :class:`dataclasses.Field`): ``metadata["flag"]``
    when given (``None``: no flag), else ``--`` and the field's name with ``-`` for ``_``."""
    if "flag" in f.metadata:
        return f.metadata["flag"]
    return "--" + f.name.replace("_", "-")


def _fail(cls: type, name: str, value: Any, allowed: str) -> None:
    raise EstimationError(f"{cls.__name__}({name}={value!r}): {name} must be {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(obj: Any, name: str, minimum: int, *, optional: bool = False) -> None:
    v = getattr(obj, name)
    if optional and v is None:
        return
    if not _is_int(v) or v < minimum:
        _fail(type(obj), name, v, f"an integer >= {minimum}" + (" or None" if optional else ""))


def _check_number(
    obj: Any,
    name: str,
    low: float,
    high: float | None = None,
    *,
    optional: bool = False,
    open_low: bool = False,
) -> None:
    v = getattr(obj, name)
    if optional and v is None:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > low if open_low else v >= low)
    if ok and high is not None:
        ok = v <= high
    if not ok:
        rng = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        _fail(type(obj), name, v, f"a number {rng}" + (" or None" if optional else ""))


def _check_bool(obj: Any, name: str) -> None:
    if not isinstance(getattr(obj, name), bool):
        _fail(type(obj), name, getattr(obj, name), "True or False")


def _check_choice(obj: Any, name: str, choices: Iterable[Any]) -> None:
    if getattr(obj, name) not in tuple(choices):
        _fail(type(obj), name, getattr(obj, name), f"one of {tuple(choices)}")


def _check_dtype(obj: Any, name: str) -> None:
    """A dtype option: ``None``, a name of :data:`DTYPES` (``"torch."`` prefix allowed) or the dtype."""
    v = getattr(obj, name)
    if v is None:
        return
    text = v if isinstance(v, str) else (str(v) if type(v).__module__ == "torch" else None)
    if text is None or text.removeprefix("torch.") not in DTYPES:
        _fail(type(obj), name, v, f"None, a torch dtype or its name, one of {DTYPES}")


def _torch_dtype(v: Any) -> Any:
    """The torch.dtype of a dtype option (``None`` stays ``None``); torch is imported here only."""
    if v is None or not isinstance(v, str):
        return v
    import torch

    return getattr(torch, v.removeprefix("torch."))


class _Options:
    """What the three option sets share: ``changed()``, ``to_dict()``."""

    #: set by ``@dataclass`` on each option set (declared here so that ``fields(self)`` type-checks)
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def changed(self) -> dict[str, Any]:
        """The fields whose values differ from their defaults (``{name: value}``)."""
        out = {}
        for f in fields(self):
            default = f.default  # every field has a plain default
            value = getattr(self, f.name)
            if not (value is default or _same(value, default)):
                out[f.name] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """The changed fields as JSON-friendly values (dtypes and objects as text), for recording."""

        def plain(v: Any) -> Any:
            if v is None or isinstance(v, (bool, int, float, str)):
                return v
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return str(v)

        return {k: plain(v) for k, v in self.changed().items()}


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. a tensor-like value: not comparable, so not the default
        return False


@dataclass(frozen=True)
class CaptureOptions(_Options):
    """What an activation capture reads, and how its layers are pooled (activation methods:
    ``"sign_marginalized"``, ``"signed"``, ``"permutation"``, ``"orthogonal"``). Texts are cut
    into windows of ``max_length`` tokens, ``batch_size`` sequences per forward pass, until
    ``max_tokens`` tokens have entered the statistics."""

    tokenizer: Any = _opt(
        None,
        "tokenizer of the texts: a tokenizer, or a directory or Hub id to load one "
        "from (default: the source checkpoint's)",
    )
    layers: Any = _opt(
        None,
        "residual layers to capture and pool (0 = embedding output; negatives count "
        "from the end; default: all)",
        type=int,
        nargs="*",
    )
    batch_size: int = _opt(8, "sequences per forward pass (also the unit split over processes and shards)")
    max_length: int = _opt(256, "tokens per text window (longer texts become several windows)")
    max_tokens: int | None = _opt(
        None, "stop after this many tokens have entered the statistics (default: all)", type=int
    )
    dtype: Any = _opt(
        None,
        "activation methods: load the models in this dtype (the sums stay float64); "
        "weights: the products' dtype (default float32)",
        choices=DTYPES,
    )
    device_map: Any = _opt(
        None,
        'accelerate device map to load the models with, e.g. "auto" (offloads what '
        "does not fit; default: CPU, or this rank's GPU under torchrun with CUDA)",
    )
    pooling: str = _opt("mean_abs", "how the layers' correlations are pooled", choices=POOLINGS)
    progress: bool = _opt(True, "show progress bars (the CLI's -q hides them)", flag=None)
    group: Any = _opt(
        None,
        "torch.distributed process group to split the capture over (default: the default "
        "group; the CLI uses torchrun's)",
        flag=None,
    )
    # tuning of the capture itself (no flags: they change cost, not results)
    skip_first: bool = _opt(
        True, "leave out the first token of every sequence (it has no context)", flag=None
    )
    product_dtype: Any = _opt(
        None, "precision of the centred d×d products (default float32, float64 for float64 models)", flag=None
    )
    stats_device: Any = _opt(None, "device the sums are kept on (default: where each layer ran)", flag=None)

    def __post_init__(self) -> None:
        layers = self.layers
        if layers is not None:
            layers = (layers,) if _is_int(layers) else layers
            if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Iterable):
                _fail(type(self), "layers", self.layers, "None, an integer or integers")
            layers = tuple(layers)
            if not layers or not all(_is_int(k) for k in layers):
                _fail(type(self), "layers", self.layers, "None, an integer or a non-empty list of integers")
            object.__setattr__(self, "layers", layers)
        _check_int(self, "batch_size", 1)
        _check_int(self, "max_length", 1)
        _check_int(self, "max_tokens", 1, optional=True)
        _check_dtype(self, "dtype")
        _check_dtype(self, "product_dtype")
        _check_choice(self, "pooling", POOLINGS)
        _check_bool(self, "progress")
        _check_bool(self, "skip_first")

    @property
    def torch_dtype(self) -> Any:
        """``dtype`` as a torch.dtype (``None``: the checkpoint's)."""
        return _torch_dtype(self.dtype)

    @property
    def torch_product_dtype(self) -> Any:
        """``product_dtype`` as a torch.dtype (``None``: by the model's)."""
        return _torch_dtype(self.product_dtype)

    def matching(self) -> CaptureOptions:
        """Only the fields that matching captured statistics uses (``layers``, ``pooling``, ``group``)."""
        return CaptureOptions(layers=self.layers, pooling=self.pooling, group=self.group)


@dataclass(frozen=True)
class WeightOptions(_Options):
    """How ``method="weights"`` compares two checkpoints' tensors (data-free;
    :mod:`hf_bdgauge.estimate.signatures`): tensors are read ``block_elements`` entries at a time and
    multiplied in ``compute_dtype`` on ``device``."""

    tensor_weighting: str = _opt(
        "equal",
        "each tensor scaled to unit mean squared row norm ('equal') or used as is ('raw')",
        choices=TENSOR_WEIGHTINGS,
    )
    include_gains: bool = _opt(True, "compare the norm gains' profiles too", flag=None)
    compute_dtype: Any = _opt(
        None,
        "dtype of the products (a torch dtype or its name; default float32)",
        flag="--dtype",
        choices=DTYPES,
    )
    device: Any = _opt(
        None, 'device the products run on, e.g. "cuda" (default: CPU, or this rank\'s GPU under torchrun)'
    )
    block_elements: int = _opt(
        1 << 24, "entries of a tensor read and multiplied at once (bounds memory)", flag=None
    )
    progress: bool = _opt(True, "show a progress bar (the CLI's -q hides it)", flag=None)
    group: Any = _opt(
        None,
        "torch.distributed process group to split the tensors over (default: the default group)",
        flag=None,
    )

    def __post_init__(self) -> None:
        _check_choice(self, "tensor_weighting", TENSOR_WEIGHTINGS)
        _check_bool(self, "include_gains")
        _check_dtype(self, "compute_dtype")
        _check_int(self, "block_elements", 1)
        _check_bool(self, "progress")

    @property
    def torch_compute_dtype(self) -> Any:
        """``compute_dtype`` as a torch.dtype (default float32)."""
        return _torch_dtype(self.compute_dtype or "float32")


@dataclass(frozen=True)
class CalibrationOptions(_Options):
    """How an estimate's p-value is calibrated and its verdict read
    (:mod:`hf_bdgauge.estimate.verdict`): ``draws`` random rotations (of law ``rotation``) of the
    held-out statistic's fitted null, read against the ``reference`` null at ``level`` (with
    ``early_draws``, in two stages: :func:`~hf_bdgauge.estimate.calibration.calibrate`);
    ``null_draws`` rotations of the descriptive null; ``identity_tol``: a gauge moving at most this
    fraction of the coordinates reads as the identity."""

    draws: int = _opt(
        CALIBRATION_DRAWS,
        "random rotations of the calibrated p-value's fitted null (cost grows with it, d² log d and layers)",
        flag="--calibration-draws",
        type=int,
    )
    null_draws: int = _opt(1, "draws of the descriptive rotated null (excess over null; 0 skips it)")
    seed: int = _opt(0, "seed of the rotations")
    rotation: str = _opt(
        "structured",
        "law of the null's random rotations: 'structured' (permutations, signs and DCTs, O(d² log d), "
        "null law shown equal to Haar's) or 'haar' (QR of a Gaussian matrix, O(d³))",
        flag="--calibration-rotation",
        choices=ROTATIONS,
    )
    reference: Any = _opt(
        "auto",
        "reference null the p-value is read against: 'auto' (the package's, "
        "independently trained models), None (the Haar null alone) or a Reference",
        choices=("auto", "none"),
        type=str,
    )
    level: float = _opt(LEVEL, "level of the test: p <= level means a gauge relates the pair")
    identity_tol: float = _opt(
        0.01,
        "fraction of moved coordinates (or rotation distance) below which the gauge reads as the identity",
    )
    early_draws: int = _opt(
        0,
        "two-stage draws: first this many (>= 3, < draws), stopping there when their p-value is "
        "<= early_p, else all draws (0: every draw, the default); under the null the reported "
        "p-value is <= level with probability at most level + early_p",
        flag="--calibration-early-draws",
        type=int,
    )
    early_p: float = _opt(
        1e-6,
        "p-value at or below which the two-stage draws stop after early_draws",
        flag="--calibration-early-p",
        type=float,
    )

    def __post_init__(self) -> None:
        _check_int(self, "draws", 3)
        _check_int(self, "null_draws", 0)
        _check_int(self, "early_draws", 0)
        if self.early_draws and not 3 <= self.early_draws < self.draws:
            _fail(type(self), "early_draws", self.early_draws, f"0 or an integer in [3, draws={self.draws})")
        _check_number(self, "early_p", 0.0, 1.0, open_low=True)
        _check_int(self, "seed", 0)
        _check_choice(self, "rotation", ROTATIONS)
        ref = self.reference
        if isinstance(ref, str):
            if ref.lower() == "none":
                object.__setattr__(self, "reference", None)
            elif ref != "auto":
                _fail(type(self), "reference", ref, "'auto', None or a Reference")
        elif ref is not None and type(ref).__name__ != "Reference":  # verdict.Reference (torch-free check)
            _fail(type(self), "reference", ref, "'auto', None or a Reference")
        _check_number(self, "level", 0.0, 1.0, open_low=True)
        _check_number(self, "identity_tol", 0.0, 1.0)


def refuse_unused(
    options: _Options | None, used: Iterable[str], argument: str, where: str, cli_where: str | None = None
) -> None:
    """Refuse the fields of ``options`` (passed as ``argument=``) that differ from their defaults
    and that ``where`` (e.g. ``"method='orthogonal_weights'"``) does not use: an
    :class:`~hf_bdgauge.errors.EstimationError` naming them in Python words (``str(error)``) and,
    for the CLI, by their flags (``error.for_interface("cli")``)."""
    if options is None:
        return
    used = tuple(used)
    extra = [k for k in options.changed() if k not in used]
    if not extra:
        return
    cls = type(options).__name__
    by_name = {f.name: f for f in fields(options)}
    given = ", ".join(f"{k}={getattr(options, k)!r}" for k in extra)
    flags = ", ".join(flag_name(by_name[k]) or k for k in extra)
    uses = f" (it uses only {', '.join(used)} of {cls})" if used else f" (it uses no field of {cls})"
    raise EstimationError(
        "{given} {verb} not apply to {where}{uses}: drop {them}",
        options={
            "given": Words(f"{argument}={cls}({given})", flags),
            "verb": Words("does", "do" if len(extra) > 1 else "does"),
            "where": Words(where, cli_where or where),
            "uses": Words(uses, ""),
            "them": Words(", ".join(extra), "them" if len(extra) > 1 else "it"),
        },
    )
