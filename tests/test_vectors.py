"""Directions made elsewhere: every file format `isokl_tl.vectors` reads (and the bad files it
refuses in one line), SAE features, `Direction.from_vector`, and a run steered along a file."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from isokl_tl.directions import Direction
from isokl_tl.vectors import read_sae_feature, read_vector

D = 64          # the tiny model's d_model


@pytest.fixture
def vec():
    return torch.randn(D, generator=torch.Generator().manual_seed(3))


def write_control_vector(path, vectors: dict[int, torch.Tensor]):
    """A llama.cpp control vector: `direction.N` is added to the output of block N (from 0; llama.cpp's
    `llama_adapter_cvec` puts it on layer N's output and has none for block 0)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", len(vectors))
    for block, v in vectors.items():
        w.add_tensor(f"direction.{block}", v.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_sae(where, w_dec: torch.Tensor, hook: str):
    where.mkdir(parents=True, exist_ok=True)
    (where / "cfg.json").write_text(json.dumps({"d_in": w_dec.shape[1], "d_sae": w_dec.shape[0],
                                                "metadata": {"hook_name": hook}}))
    save_file({"W_dec": w_dec.contiguous(), "W_enc": w_dec.T.contiguous(), "b_dec": torch.zeros(w_dec.shape[1])},
              str(where / "sae_weights.safetensors"))
    return where


def test_every_format_reads_the_vector_it_holds(vec, tmp_path):
    save_file({"v": vec}, str(tmp_path / "one.safetensors"))
    save_file({"a": vec, "b": -vec}, str(tmp_path / "two.safetensors"))
    torch.save(vec, tmp_path / "v.pt")
    torch.save({"layer_3": vec[None]}, tmp_path / "d.pt")
    np.save(tmp_path / "v.npy", vec.numpy())
    write_control_vector(tmp_path / "cv.gguf", {1: -vec, 2: vec})
    cases = [("one.safetensors", {}), ("two.safetensors", {"key": "b"}), ("v.pt", {}), ("d.pt", {}),
             ("v.npy", {}), ("cv.gguf", {"layer": 2})]
    for name, kw in cases:
        got, source = read_vector(tmp_path / name, **kw)
        want = -vec if kw.get("key") == "b" else vec
        assert torch.equal(got, want), name
        assert source["sha256"] and source["source"].endswith(name)
    assert read_vector(tmp_path / "cv.gguf", layer=1)[1]["key"] == "direction.1"
    assert torch.equal(read_vector(tmp_path / "cv.gguf", layer=1)[0], -vec)


def test_bad_files_say_what_is_wrong_in_one_line(vec, tmp_path):
    save_file({"a": vec, "b": vec.clone()}, str(tmp_path / "two.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    np.save(tmp_path / "m.npy", np.ones((3, D)))
    (tmp_path / "v.txt").write_text("1 2 3")
    write_control_vector(tmp_path / "cv.gguf", {2: vec})
    cases = [("two.safetensors", {}, "holds 2 tensors.*--direction-key"),
             ("two.safetensors", {"key": "c"}, "has no tensor 'c'; it holds a, b"),
             ("junk.safetensors", {}, "could not be read as .safetensors"),
             ("m.npy", {}, r"expected one vector, got a tensor of shape \(3, 64\)"),
             ("v.txt", {}, "unknown format"),
             ("missing.npy", {}, "does not exist"),
             ("cv.gguf", {"layer": 1}, r"no vector for block 1 \(direction.1\); it has blocks \[2\]"),
             ("cv.gguf", {}, "control vector: steer at a block's output")]
    for name, kw, message in cases:
        with pytest.raises(ValueError, match=message):
            read_vector(tmp_path / name, **kw)


def test_sae_features_and_their_hook(tmp_path):
    w_dec = torch.randn(10, D, generator=torch.Generator().manual_seed(4))
    sae = write_sae(tmp_path / "sae", w_dec, "blocks.1.hook_resid_pre")
    row, hook, source = read_sae_feature(sae, 7)
    assert torch.equal(row, w_dec[7]) and hook == "blocks.1.hook_resid_pre" and source["feature"] == 7
    with pytest.raises(ValueError, match="feature 10 is out of range: the SAE has 10 features"):
        read_sae_feature(sae, 10)
    with pytest.raises(ValueError, match="not a SAELens SAE directory: no cfg.json or sae_weights"):
        read_sae_feature(tmp_path, 0)


def test_from_vector_checks_normalises_and_measures(tiny, vec):
    d = Direction.from_vector(3 * vec, "blocks.2.hook_resid_post", tiny, source={"sha256": "x"})
    assert d.method == "external" and d.intervention == "add" and d.extra == {"sha256": "x"}
    torch.testing.assert_close(d.vector.norm(), torch.tensor(1.0))
    assert d.raw_norm == pytest.approx(3 * float(vec.norm()), rel=1e-5) and d.resid_norm > 0 and d.n_pairs > 1
    assert Direction.from_vector(vec, "blocks.2.hook_resid_post", tiny, ablate=True).intervention == "ablate"
    with pytest.raises(ValueError, match=r"shape \(63,\); expected \(64,\)"):
        Direction.from_vector(vec[:63], "blocks.2.hook_resid_post", tiny)
    with pytest.raises(ValueError, match="NaN or inf"):
        Direction.from_vector(vec.clone().index_fill_(0, torch.tensor([5]), float("nan")), "blocks.2.hook_resid_post",
                              tiny)
    with pytest.raises(ValueError, match="zero vector"):
        Direction.from_vector(torch.zeros(D), "blocks.2.hook_resid_post", tiny)
    tokens = torch.tensor([[5, 6, 7, 8]])                  # c = 0: exactly the base model
    with torch.no_grad(), d.steer(tiny, 0.0):
        steered = tiny(tokens)
    assert torch.equal(steered, tiny(tokens))


def test_a_run_steers_along_a_file_and_an_sae_feature(tiny, vec, tmp_path):
    from isokl_tl.config import RunConfig
    from isokl_tl.run import Run

    np.save(tmp_path / "v.npy", vec.numpy())
    small = dict(model="tiny-random", n_calib=2, calib_window=6, bootstrap=0, tol=0.1)
    run = Run(tmp_path / "run", RunConfig(direction_file=str(tmp_path / "v.npy"), layer=2, **small), model=tiny,
              progress=False, log=lambda m: None)
    run.check(("direction", "calibrate"))
    d, cal = run.direction(), run.calibrate()
    assert d.method == "external" and d.hook == "blocks.2.hook_resid_post" and cal.c_star > 0
    assert torch.allclose(d.vector, vec / vec.norm()) and len(d.extra["sha256"]) == 64
    np.save(tmp_path / "v.npy", -vec.numpy())              # a new vector at the same path: a new direction
    again = Run(tmp_path / "run", RunConfig(direction_file=str(tmp_path / "v.npy"), layer=2, **small), model=tiny,
                progress=False, log=lambda m: None)
    assert not again.current("direction")
    sae = write_sae(tmp_path / "sae", torch.stack([vec, -vec]), "blocks.1.hook_resid_pre")
    from_sae = Run(tmp_path / "sae_run", RunConfig(sae=str(sae), feature=1, **small), model=tiny, progress=False,
                   log=lambda m: None)
    assert from_sae.direction().hook == "blocks.1.hook_resid_pre"
    with pytest.raises(ValueError, match="the SAE reads blocks.1.hook_resid_pre; drop --hook/--layer"):
        Run(tmp_path / "bad", RunConfig(sae=str(sae), feature=1, layer=2, **small), model=tiny,
            progress=False, log=lambda m: None).check(("direction",))
    with pytest.raises(ValueError, match="--method pca builds a direction from the pairs"):
        RunConfig(direction_file="v.npy", method="pca")
    with pytest.raises(ValueError, match="needs both --sae DIR and --feature N"):
        RunConfig(sae=str(sae))


def test_cli_direction_from_a_file(vec, tmp_path):
    from click.testing import CliRunner
    from isokl_tl_cli.main import main

    torch.save(vec, tmp_path / "v.pt")
    res = CliRunner().invoke(main, ["direction", "--model", "tiny-random", "--direction", str(tmp_path / "v.pt"),
                                    "--layer", "1", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "\nexternal direction at blocks.1.hook_resid_post: raw norm" in res.output
    bad = CliRunner().invoke(main, ["direction", "--model", "tiny-random", "--direction", str(tmp_path / "no.npy"),
                                    "--out", str(tmp_path / "run2")])
    assert bad.exit_code != 0 and "does not exist" in bad.output and "Traceback" not in bad.output
