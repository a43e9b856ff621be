"""The result store: digests by content, model fingerprints by weights, seeds as before, stages and parts."""
import copy

import pytest
import torch

from kdfast import models
from kdfast.store import Parts, Store, digest, digest_bytes, file_digest, model_fingerprint, seed_from


def test_digest_is_of_content():
    a = {"x": 1, "y": [1, 2, {"b": 2, "a": 1}]}
    b = {"y": [1, 2, {"a": 1, "b": 2}], "x": 1}
    assert digest(a) == digest(b) == digest(copy.deepcopy(a)) and len(digest(a)) == 16
    assert digest(a) != digest({**a, "x": 2}) and digest([1, 2]) != digest([2, 1])
    assert len(digest(a, 12)) == 12 and digest(a, 64).startswith(digest(a))
    assert digest_bytes(b"abc") != digest_bytes(b"abd")


def test_file_digest(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    assert file_digest(path) == digest_bytes(b"x" * 100)


def test_model_fingerprint_follows_the_weights():
    model = models.tiny_model("llama", seed=0)
    before = model_fingerprint(model)
    twin = models.tiny_model("llama", seed=1)
    assert model_fingerprint(twin) != before
    twin.load_state_dict(model.state_dict())  # the same weights in another module object
    assert model_fingerprint(twin) == before
    with torch.no_grad():
        p = next(p for n, p in model.named_parameters() if "mlp" in n)
        p.view(-1)[p.numel() // 2 + 1] += 1e-3  # one weight, wherever it sits
    assert model_fingerprint(model) != before


def test_seed_from_gives_the_old_seeds():
    # Values computed by the code before kdfast.store existed: DistillContext.seed (sha256 of ":"-joined parts,
    # 7 bytes little-endian) and attacks.perturb.noise_seed (of "seed/index/name", 8 bytes, 63 bits).
    assert seed_from(0, 0, "seqkd", 0, bits=56) == 24498746993270383
    assert seed_from(42, 1, "sample", 3, "x", bits=56) == 71963569078811878
    assert seed_from(7, 0, bits=56) == 57759226321305589
    assert seed_from(0, 0, "w", sep="/") == 3095981765379215825
    assert seed_from(3, 7, "model.layers.0.mlp.up_proj.weight", sep="/") == 713891752498305501
    assert seed_from(12345, 2, "lm_head.weight", sep="/") == 7585950917056239958


def test_store_reuses_finished_work_and_only_that(tmp_path):
    store, calls = Store(tmp_path, log=None), []

    def work(folder):
        calls.append(folder)
        (folder / "out.txt").write_text("done")
        return {"value": len(calls)}

    result, folder = store.run("stage", {"a": 1}, work)
    assert result["value"] == 1 and (folder / "out.txt").read_text() == "done" and store.has("stage", {"a": 1})
    assert store.run("stage", {"a": 1}, work)[0]["value"] == 1 and len(calls) == 1
    assert store.run("stage", {"a": 2}, work)[0]["value"] == 2 and len(calls) == 2
    assert store.ran == ["stage", "stage"] and store.reused == ["stage"]

    def killed(folder):
        (folder / "checkpoint").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.run("stage", {"a": 3}, killed)
    assert not store.has("stage", {"a": 3}) and not store.folder("stage", {"a": 3}).exists()
    partial = store.folder("stage", {"a": 3}).with_name(store.folder("stage", {"a": 3}).name + ".partial")
    assert (partial / "checkpoint").read_text() == "half"  # what a resumable stage continues from


def test_parts_round_trip(tmp_path):
    parts = Parts(tmp_path / "p", ["a", "b"])
    assert parts.load() == {}
    parts.write({"r1": [1.0, 2.0], "r2": [3.0, 4.0]})
    parts.write({"r3": [5.0, 6.0]})
    assert parts.load() == {"r1": [1.0, 2.0], "r2": [3.0, 4.0], "r3": [5.0, 6.0]}
    assert Parts(tmp_path / "p", ["a"]).load() == {}  # parts of other columns are not this table's
