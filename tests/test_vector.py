"""Vector files: safetensors round trip, model checks, GGUF control vectors, reference .pt imports."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import personascope as ps
from personascope.vector import PersonaVector


def _vec(layers=30, width=576, seed=0, **meta):
    torch.manual_seed(seed)
    return PersonaVector(torch.randn(layers + 1, width), "humorous", "smollm2-135m",
                         {"method": "mean_diff", "position": "response_avg", "best_layer": "15", **meta},
                         pos_mean=torch.randn(layers + 1, width), neg_mean=torch.randn(layers + 1, width))


def test_safetensors_round_trip_is_exact(tmp_path, embedded):
    vec = _vec(best_coef="4.0")
    path = vec.save(tmp_path / "v.safetensors")
    back = PersonaVector.load(path, embedded)
    assert torch.equal(back.directions, vec.directions)
    assert torch.equal(back.pos_mean, vec.pos_mean) and torch.equal(back.neg_mean, vec.neg_mean)
    assert back.trait == "humorous" and back.model == "smollm2-135m"
    assert back.best_layer == 15 and back.best_coef == 4.0
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "personascope.vector/1"
    assert meta["hidden_size"] == "576" and meta["num_layers"] == "30"
    assert {"created", "personascope_version", "method", "position"} <= set(meta)


def test_unit_and_project():
    vec = _vec()
    unit = vec.unit(7)
    assert torch.isclose(unit.norm(), torch.tensor(1.0))
    hidden = torch.randn(3, 4, 576)
    torch.testing.assert_close(vec.project(hidden, 7), hidden @ unit)


def test_gguf_export_import_round_trip(tmp_path):
    vec = _vec()
    out = vec.export_gguf(tmp_path / "v.gguf")
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "smollm2-135m"
    assert reader.fields["controlvector.layer_count"].contents() == 29
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(tensors, key=lambda n: int(n.split(".")[1])) == [f"direction.{n}" for n in range(1, 30)]
    # llama.cpp adds direction.N to the output of its block N = HF hidden_states[N + 1] = our row N + 1
    np.testing.assert_array_equal(tensors["direction.1"], vec.directions[2].numpy())
    np.testing.assert_array_equal(tensors["direction.29"], vec.directions[30].numpy())
    back = PersonaVector.import_gguf(out)
    assert torch.equal(back.directions[2:], vec.directions[2:])
    assert torch.count_nonzero(back.directions[:2]) == 0
    assert back.trait == "humorous" and back.model == "smollm2-135m" and back.best_layer == 15


def test_gguf_import_of_foreign_control_vector(tmp_path):
    """A repeng/llama.cpp-style file without our metadata imports with the same index mapping."""
    path = tmp_path / "foreign.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    rows = {3: np.full(8, 1.5, np.float32), 5: np.arange(8, dtype=np.float32)}
    for block, row in rows.items():
        writer.add_tensor(f"direction.{block}", row)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    back = PersonaVector.import_gguf(path, trait="calm")
    assert back.directions.shape == (7, 8) and back.model == "llama" and back.trait == "calm"
    np.testing.assert_array_equal(back.directions[4].numpy(), rows[3])
    np.testing.assert_array_equal(back.directions[6].numpy(), rows[5])


def test_reference_pt_import_uses_weights_only(tmp_path, embedded):
    tensor = torch.randn(31, 576)
    path = tmp_path / "evil_response_avg_diff.pt"
    torch.save(tensor, path)
    vec = PersonaVector.import_pt(path, embedded)
    assert vec.trait == "evil" and torch.equal(vec.directions, tensor)
    evil = tmp_path / "pickle.pt"
    torch.save({"x": object()}, evil)
    with pytest.raises(ps.PersonascopeError, match="weights_only"):
        PersonaVector.import_pt(evil, embedded)


def test_vector_for_another_model_is_refused(tmp_path, embedded):
    path = _vec(layers=24, width=896).save(tmp_path / "other.safetensors")
    with pytest.raises(ps.PersonascopeError, match="hidden size 896 vs the model's 576; 24 layers vs the model's 30"):
        PersonaVector.load(path, embedded)
    renamed = PersonaVector(torch.randn(31, 576), "evil", "qwen2.5-7b")
    with pytest.raises(ps.PersonascopeError, match="made for model 'qwen2.5-7b'"):
        renamed.check_model(embedded)


def test_bad_vectors_are_refused(tmp_path):
    with pytest.raises(ps.PersonascopeError, match="NaN"):
        PersonaVector(torch.full((31, 576), float("nan")), "evil", "m")
    path = PersonaVector(torch.zeros(31, 576), "evil", "m").save(tmp_path / "zero.safetensors")
    with pytest.raises(ps.PersonascopeError, match="all zeros"):
        PersonaVector.load(path)
    with pytest.raises(ps.PersonascopeError, match="does not exist"):
        PersonaVector.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(ps.PersonascopeError, match="not a safetensors"):
        PersonaVector.load(junk)


def _crafted(path, tensors, **meta):
    """A safetensors file written directly, as another tool or a damaged copy would leave it."""
    base = {"format": "personascope.vector/1", "trait": "evil", "model": "m"}
    save_file(tensors, str(path), metadata={**base, **meta})
    return path


@pytest.mark.parametrize("tensors, meta, message", [
    ({"directions": torch.randn(5, 8).index_put_((torch.tensor(2), torch.tensor(3)), torch.tensor(float("inf")))},
     {}, "NaN or infinite"),
    ({"directions": torch.randn(5, 8), "pos_mean": torch.full((5, 8), float("nan"))}, {}, "pos_mean for 'evil'"),
    ({"directions": torch.randn(5, 8), "neg_mean": torch.randn(4, 8)}, {}, "neg_mean has shape (4, 8)"),
    ({"directions": torch.randn(8)}, {}, "must be [L+1, d]"),
    ({"directions": torch.randn(1, 8)}, {}, "L >= 1"),
    ({"directions": torch.randn(2, 3, 8)}, {}, "must be [L+1, d]"),
    ({"directions": torch.ones(5, 8, dtype=torch.int32)}, {}, "dtype int32"),
    ({"directions": torch.ones(5, 8, dtype=torch.bool)}, {}, "dtype bool"),
    ({"directions": torch.randn(5, 8)}, {"hidden_size": "576"}, "hidden_size '576' but the directions tensor is"),
    ({"directions": torch.randn(5, 8)}, {"num_layers": "30"}, "num_layers '30'"),
    ({"directions": torch.randn(5, 8)}, {"best_layer": "9"}, "best_layer '9' is not a layer of this vector (0..4)"),
    ({"directions": torch.randn(5, 8)}, {"best_layer": "two"}, "best_layer 'two'"),
    ({"directions": torch.randn(5, 8)}, {"best_coef": "nan"}, "best_coef 'nan' is not a finite number"),
    ({"directions": torch.randn(5, 8)}, {"alert_threshold": "inf"}, "alert_threshold 'inf'"),
    ({"directions": torch.randn(5, 8)}, {"format": "personascope.vector/9"}, "has format 'personascope.vector/9'"),
    ({"pos_mean": torch.randn(5, 8)}, {}, "no 'directions' tensor"),
])
def test_damaged_or_contradictory_vector_files_are_refused_on_load(tmp_path, tensors, meta, message):
    path = _crafted(tmp_path / "v.safetensors", tensors, **meta)
    with pytest.raises(ps.PersonascopeError) as refused:
        PersonaVector.load(path)
    assert message in str(refused.value) and str(path) in str(refused.value)


def test_a_crafted_file_that_agrees_with_itself_loads(tmp_path):
    path = _crafted(tmp_path / "v.safetensors", {"directions": torch.randn(5, 8, dtype=torch.float16)},
                    hidden_size="8", num_layers="4", best_layer="", best_coef="2.5")
    vector = PersonaVector.load(path)
    assert vector.directions.dtype == torch.float32 and vector.best_layer is None and vector.best_coef == 2.5
