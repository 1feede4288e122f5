"""llama.cpp control-vector GGUF files: round trip, repeng's and llama.cpp's writers, the layer
mapping (``direction.<n>`` steers the output of decoder block ``n``: our residual layer ``n + 1``),
and bad input.

The peers' readers are not installed beside us (llama.cpp is C++, repeng pins old libraries), so
their rules are restated here from their sources: repeng's ``ControlVector.export_gguf`` /
``import_gguf`` (vgel/repeng ``repeng/extract.py``) and llama.cpp's
``common_control_vector_load_one`` (``common/common.cpp``), ``llama_adapter_cvec::apply``
(``src/llama-adapter.cpp``) and ``build_cvec(cur, il)`` at the end of every block.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (extra 'real') reads and writes control vectors")

from hf_bdgauge import SignedPermutation  # noqa: E402
from hf_bdgauge.errors import CheckpointError, DimensionMismatchError, TransportError  # noqa: E402
from hf_bdgauge.gauge import Gauge  # noqa: E402
from hf_bdgauge.layers import residual_states  # noqa: E402
from hf_bdgauge.provenance import ModelRef  # noqa: E402
from hf_bdgauge.testing import tiny_model  # noqa: E402
from hf_bdgauge.transport.control_vector import CONTROL_VECTOR_ARCH  # noqa: E402
from hf_bdgauge.transport.steering import SteeringVector  # noqa: E402

from helpers.tolerances import assert_close_rel, product_rtol  # noqa: E402

D = 16


def _vec(layers, d=D, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {i: torch.randn(d, generator=gen, dtype=dtype) for i in layers}


def _repeng_export(path, model_type: str, directions: dict[int, np.ndarray]) -> None:
    """repeng's ``ControlVector.export_gguf``, statement for statement."""
    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _raw_gguf(
    path, tensors: dict[str, np.ndarray], arch: str = "controlvector", hint: str | None = "llama"
) -> None:
    """A GGUF file the way llama-cvector-generator writes one (int32 layer_count), or a bad one."""
    writer = gguf.GGUFWriter(path, arch)
    if hint is not None:
        writer.add_string(f"{arch}.model_hint", hint)
    writer.add_int32(f"{arch}.layer_count", len(tensors))
    for name, t in tensors.items():
        writer.add_tensor(name, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _repeng_import(path) -> tuple[str, dict[int, np.ndarray]]:
    """repeng's ``ControlVector.import_gguf`` (model_hint and directions), statement for statement."""
    reader = gguf.GGUFReader(path)
    archf = reader.get_field("general.architecture")
    assert str(bytes(archf.parts[-1]), encoding="utf-8", errors="replace") == "controlvector"
    modelf = reader.get_field("controlvector.model_hint")
    if not modelf or not len(modelf.parts):
        raise ValueError(".gguf file missing controlvector.model_hint field")
    model_hint = str(bytes(modelf.parts[-1]), encoding="utf-8")
    directions = {}
    for tensor in reader.tensors:
        if not tensor.name.startswith("direction."):
            continue
        directions[int(tensor.name.split(".")[1])] = np.array(tensor.data)
    return model_hint, directions


def _llama_cpp_slots(path, n_layer: int) -> dict[int, np.ndarray]:
    """``common_control_vector_load_one`` + ``llama_adapter_cvec::apply``: which ``tensors[il]``
    (added by ``build_cvec(cur, il)`` to the output of block ``il``) receives what. Raises where
    llama.cpp would refuse the file."""
    reader = gguf.GGUFReader(path)
    n_embd, data = -1, []
    for t in reader.tensors:
        name = t.name
        dot = name.find(".")
        layer_idx = int(name[dot + 1 :]) if dot >= 0 and name[:dot] == "direction" else -1
        if layer_idx <= 0:
            raise ValueError(f"llama.cpp rejects tensor {name!r}")
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ValueError("llama.cpp rejects non-F32 direction tensors")
        if sum(1 for x in t.shape if x != 1) > 1:
            raise ValueError("llama.cpp rejects non-1D direction tensors")
        if n_embd == -1:
            n_embd = int(t.n_elements)
        elif t.n_elements != n_embd:
            raise ValueError("llama.cpp rejects direction tensors of different lengths")
        if len(data) < n_embd * layer_idx:
            data.extend([0.0] * (n_embd * layer_idx - len(data)))
        for j, x in enumerate(np.asarray(t.data, dtype=np.float32)):
            data[n_embd * (layer_idx - 1) + j] += float(x)  # layer 1 at [0]
    slots = {}
    for il in range(1, n_layer):
        off = n_embd * (il - 1)
        if off + n_embd <= len(data):
            slots[il] = np.asarray(data[off : off + n_embd], dtype=np.float32)
    return slots


# --------------------------------------------------------------------------------------- round trip
def test_round_trip_is_exact_and_keeps_layers_metadata_and_hint(tmp_path):
    sv = SteeringVector(_vec([6, 2, 4]), metadata={"model_id": "org/m", "note": "x"})
    path = sv.save_gguf(tmp_path / "cv.gguf", model_hint="llama")
    assert path == tmp_path / "cv.gguf" and path.is_file()
    back = SteeringVector.load_gguf(path)
    assert back.layers == [2, 4, 6] and back.layer_type == "decoder_block"
    assert all(torch.equal(back[i], sv[i]) and back[i].dtype == torch.float32 for i in sv.layers)
    assert back.metadata == {**sv.metadata, "model_hint": "llama", "model_type": "llama"}
    # a second trip changes nothing; the metadata (e.g. transport records) travels in the file
    again = SteeringVector.load_gguf(back.save_gguf(tmp_path / "cv2.gguf"))
    assert again.metadata == back.metadata and all(torch.equal(again[i], sv[i]) for i in sv.layers)
    # other float dtypes are written as float32 (what llama.cpp reads)
    wide = SteeringVector(_vec([2], dtype=torch.float64), metadata={"model_type": "qwen2"})
    got = SteeringVector.load_gguf(wide.save_gguf(tmp_path / "wide.gguf"))
    assert got[2].dtype == torch.float32 and torch.allclose(got[2].double(), wide[2], rtol=1e-6)


def test_file_has_the_llama_cpp_layout(tmp_path):
    # residual layers 4 and 2 = the outputs of blocks 3 and 1
    path = SteeringVector(_vec([4, 2]), metadata={"model_type": "gemma3_text"}).save_gguf(
        tmp_path / "cv.gguf"
    )
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == CONTROL_VECTOR_ARCH == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "gemma3_text"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    assert [(t.name, t.tensor_type, [int(x) for x in t.shape]) for t in reader.tensors] == [
        ("direction.1", gguf.GGMLQuantizationType.F32, [D]),
        ("direction.3", gguf.GGMLQuantizationType.F32, [D]),
    ]


@pytest.mark.parametrize("order", ["repeng", "ascending"])
def test_a_file_written_in_repengs_exact_style_loads(tmp_path, order):
    # repeng's default layers are range(-1, -n_layers, -1) normalised: n-1, ..., 1 (descending)
    n_layers = 6
    keys = list(range(n_layers - 1, 0, -1)) if order == "repeng" else list(range(1, n_layers))
    directions = {k: v.numpy() for k, v in _vec(keys, seed=3).items()}
    _repeng_export(tmp_path / "repeng.gguf", "mistral", directions)
    sv = SteeringVector.load_gguf(tmp_path / "repeng.gguf")
    assert sv.layers == sorted(k + 1 for k in keys) and sv.dim == D  # block k's output = residual layer k + 1
    assert all(np.array_equal(sv[k + 1].numpy(), directions[k]) for k in keys)
    assert sv.metadata == {
        "source_format": "llama.cpp-control-vector",
        "model_hint": "mistral",
        "model_type": "mistral",
    }
    # and back to repeng: the same keys (repeng's key i steers block i, as direction.i does)
    out = sv.to_repeng_kwargs()
    assert out["model_type"] == "mistral" and set(out["directions"]) == set(keys)


def test_a_file_in_llama_cvector_generator_style_loads(tmp_path):
    # llama-cvector-generator: int32 layer_count, direction.1 .. direction.(n_layer-1)
    tensors = {f"direction.{i}": v.numpy() for i, v in _vec(range(1, 4), seed=4).items()}
    _raw_gguf(tmp_path / "gen.gguf", tensors, hint="llama")
    sv = SteeringVector.load_gguf(tmp_path / "gen.gguf")
    assert sv.layers == [2, 3, 4] and np.array_equal(sv[3].numpy(), tensors["direction.2"])


def test_our_file_reads_in_repeng_and_in_llama_cpp_at_the_same_layers(tmp_path):
    sv = SteeringVector(_vec([2, 3, 4]), metadata={"model_type": "llama"})
    path = sv.save_gguf(tmp_path / "cv.gguf")
    hint, directions = _repeng_import(path)
    assert hint == "llama" and sorted(directions) == [1, 2, 3]
    assert all(np.array_equal(directions[i - 1], sv[i].numpy()) for i in sv.layers)
    slots = _llama_cpp_slots(path, n_layer=4)
    assert sorted(slots) == [1, 2, 3] and all(np.array_equal(slots[i - 1], sv[i].numpy()) for i in sv.layers)


def test_several_tensors_for_one_layer_are_summed_as_in_llama_cpp(tmp_path):
    v = _vec([0, 1], seed=7)
    _raw_gguf(tmp_path / "dup.gguf", {"direction.3": v[0].numpy(), "direction.03": v[1].numpy()})
    sv = SteeringVector.load_gguf(tmp_path / "dup.gguf")
    assert sv.layers == [4] and torch.allclose(sv[4], v[0] + v[1])
    assert np.allclose(_llama_cpp_slots(tmp_path / "dup.gguf", 5)[3], (v[0] + v[1]).numpy())


# ------------------------------------------------------------------------------------ the mapping
def test_direction_n_is_added_to_the_output_of_decoder_block_n(tmp_path):
    """llama.cpp's direction.n = the output of ``model.model.layers[n]`` = our residual layer n + 1."""
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    _raw_gguf(tmp_path / "cv.gguf", {"direction.2": v.numpy()})
    sv = SteeringVector.load_gguf(tmp_path / "cv.gguf")
    sv.check_fits(model)
    assert sv.layers == [3]
    base = residual_states(model, ids, [0, 1, 2, 3, 4])
    with sv.apply(model, alpha=0.5):
        steered = residual_states(model, ids, [0, 1, 2, 3, 4])
    for i in (0, 1, 2):
        assert torch.equal(steered[i], base[i])  # up to block 2's output: untouched
    # block 2's output + α·v: (h + α·v) - h rounds twice, relative to |h| + |α·v|, not to |α·v|
    assert_close_rel(
        steered[3] - base[3],
        0.5 * v.expand_as(base[3]),
        rtol=product_rtol(torch.float32, 2),
        scale=base[3].abs() + 0.5 * v.abs(),
        what="block 2's output + α·v",
    )
    assert not torch.allclose(steered[4], base[4])  # and the change propagates
    # the slot llama.cpp fills: tensors[2], added by build_cvec(cur, il=2); block 1 gets zeros
    slots = _llama_cpp_slots(tmp_path / "cv.gguf", n_layer=4)
    assert sorted(slots) == [1, 2] and not slots[1].any() and np.array_equal(slots[2], v.numpy())


def test_negative_keys_resolve_against_num_layers(tmp_path):
    sv = SteeringVector(_vec([-1, -3]), metadata={"model_type": "llama"})
    with pytest.raises(TransportError, match="num_layers"):
        sv.save_gguf(tmp_path / "cv.gguf")
    assert not (tmp_path / "cv.gguf").exists()
    back = SteeringVector.load_gguf(sv.save_gguf(tmp_path / "cv.gguf", num_layers=6))  # residual layers 0..6
    assert back.layers == [4, 6] and torch.equal(back[6], sv[-1]) and torch.equal(back[4], sv[-3])
    with pytest.raises(TransportError, match="same layer"):
        SteeringVector(_vec([-1, 6]), metadata={"model_type": "llama"}).save_gguf(
            tmp_path / "x.gguf", num_layers=6
        )


def test_steering_vectors_library_shape_survives_the_gguf_trip(tmp_path):
    """``steering_vectors.SteeringVector(layer_activations, layer_type)`` (not imported: it pins
    transformers < 5) keys blocks like llama.cpp, so it goes to llama.cpp and back unchanged."""
    theirs = SimpleNamespace(layer_activations=_vec([2, 4], seed=9), layer_type="decoder_block")
    ours = SteeringVector.from_steering_vectors(theirs)
    back = SteeringVector.load_gguf(ours.save_gguf(tmp_path / "sv.gguf", model_hint="llama"))
    kwargs = back.to_steering_vectors_kwargs()
    assert kwargs["layer_type"] == "decoder_block" and sorted(kwargs["layer_activations"]) == [2, 4]
    assert all(torch.equal(kwargs["layer_activations"][i], theirs.layer_activations[i]) for i in (2, 4))
    g = SignedPermutation.random(D, seed=2)
    assert ours.layers == [3, 5]
    moved = SteeringVector.load_gguf(ours.transport(g).save_gguf(tmp_path / "moved.gguf", model_hint="llama"))
    assert torch.equal(moved[5], g.apply_vector(theirs.layer_activations[4]))


# ---------------------------------------------------------------------------------------- bad input
def test_layer_zero_and_other_unwritable_vectors_are_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "cv.gguf"
    cases = [
        (SteeringVector(_vec([0, 2]), metadata={"model_type": "llama"}), {}, "layer 0"),
        (SteeringVector(_vec([1, 2]), metadata={"model_type": "llama"}), {}, "layer 1"),
        (SteeringVector(_vec([2, 9]), metadata={"model_type": "llama"}), {"num_layers": 6}, "does not exist"),
        (SteeringVector(_vec([2]), "attention", {"model_type": "llama"}), {}, "decoder-block"),
        (SteeringVector(_vec([2])), {}, "model_hint"),
        (
            SteeringVector({2: torch.full((D,), float("nan"))}, metadata={"model_type": "llama"}),
            {},
            "non-finite",
        ),
    ]
    for sv, kw, msg in cases:
        with pytest.raises(TransportError, match=msg):
            sv.save_gguf(out, **kw)
        assert os.listdir(tmp_path) == []


def test_existing_file_needs_overwrite_and_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "cv.gguf"
    first = SteeringVector(_vec([2]), metadata={"model_type": "llama"})
    first.save_gguf(out)
    before = out.read_bytes()
    second = SteeringVector(_vec([2], seed=5), metadata={"model_type": "llama"})
    with pytest.raises(CheckpointError, match="overwrite"):
        second.save_gguf(out)

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        second.save_gguf(out, overwrite=True)
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["cv.gguf"]  # no temp file left
    monkeypatch.undo()
    second.save_gguf(out, overwrite=True)
    assert torch.equal(SteeringVector.load_gguf(out)[2], second[2])


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="control vector file .*missing.gguf does not exist"):
        SteeringVector.load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        SteeringVector.load_gguf(tmp_path / "junk.gguf")
    good = SteeringVector(_vec([2, 3]), metadata={"model_type": "llama"}).save_gguf(tmp_path / "good.gguf")
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:-D])
    with pytest.raises(CheckpointError):
        SteeringVector.load_gguf(tmp_path / "cut.gguf")
    v = np.ones(D, dtype=np.float32)
    _raw_gguf(tmp_path / "model.gguf", {"blk.0.attn_norm.weight": v}, arch="llama")
    with pytest.raises(CheckpointError, match="architecture 'llama'"):
        SteeringVector.load_gguf(tmp_path / "model.gguf")
    _raw_gguf(tmp_path / "extra.gguf", {"direction.1": v, "blk.0.attn_norm.weight": v})
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        SteeringVector.load_gguf(tmp_path / "extra.gguf")
    _raw_gguf(tmp_path / "neg.gguf", {"direction.-1": v})
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        SteeringVector.load_gguf(tmp_path / "neg.gguf")
    _raw_gguf(tmp_path / "int.gguf", {"direction.1": np.ones(D, dtype=np.int32)})
    with pytest.raises(CheckpointError, match="F32"):
        SteeringVector.load_gguf(tmp_path / "int.gguf")
    _raw_gguf(tmp_path / "2d.gguf", {"direction.1": np.ones((2, D), dtype=np.float32)})
    with pytest.raises(DimensionMismatchError, match="one-dimensional"):
        SteeringVector.load_gguf(tmp_path / "2d.gguf")
    _raw_gguf(tmp_path / "ragged.gguf", {"direction.1": v, "direction.2": np.ones(D + 1, dtype=np.float32)})
    with pytest.raises(DimensionMismatchError, match="same length"):
        SteeringVector.load_gguf(tmp_path / "ragged.gguf")
    _raw_gguf(tmp_path / "empty.gguf", {})
    with pytest.raises(CheckpointError, match="no direction"):
        SteeringVector.load_gguf(tmp_path / "empty.gguf")


def test_a_repeng_file_with_direction_0_loads_with_a_warning(tmp_path, caplog):
    _repeng_export(tmp_path / "zero.gguf", "llama", {k: v.numpy() for k, v in _vec([0, 1]).items()})
    with caplog.at_level("WARNING", logger="hf_bdgauge.transport.steering"):
        sv = SteeringVector.load_gguf(tmp_path / "zero.gguf")
    assert sv.layers == [1, 2] and "direction.0" in caplog.text
    with pytest.raises(ValueError, match="rejects"):
        _llama_cpp_slots(tmp_path / "zero.gguf", 4)  # llama.cpp refuses the file as a whole
    with pytest.raises(TransportError, match="layer 1"):  # block 0's output: llama.cpp has no slot
        sv.save_gguf(tmp_path / "again.gguf")


def test_a_vector_that_does_not_fit_the_model_is_refused():
    model = tiny_model("llama", num_hidden_layers=4)
    with pytest.raises(DimensionMismatchError, match="hidden size is 64"):
        SteeringVector(_vec([1], d=32)).check_fits(model)
    with pytest.raises(TransportError, match="last of 4 blocks"):
        SteeringVector(_vec([1, 5], d=64)).check_fits(model)
    SteeringVector(_vec([0, 4], d=64)).check_fits(model)  # residual layers 0..4
    SteeringVector(_vec([0, -1], d=64)).check_fits(model)  # -1 is the last, 4
    # a gauge that recorded its models' depth refuses a layer they lack before anything moves
    g = Gauge(SignedPermutation.random(64, seed=1), source=ModelRef.from_model(model, content=False))
    with pytest.raises(TransportError, match="last of 4 blocks"):
        SteeringVector(_vec([7], d=64)).transport(g)
    with pytest.raises(DimensionMismatchError, match="dimension 32"):
        SteeringVector(_vec([1], d=32)).transport(g)
    assert SteeringVector(_vec([3], d=64)).transport(g).layers == [3]
