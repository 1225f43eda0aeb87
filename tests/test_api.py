"""The public API: every name in `isokl_tl.__all__` is the documented object, and each function is
called here, through the package's top-level name, on the tiny model."""

import importlib
import inspect
import pkgutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import isokl_tl


class Api:
    """The package, remembering which of its names a test used."""

    def __init__(self):
        self.used: set[str] = set()

    def __getattr__(self, name):
        self.used.add(name)
        return getattr(isokl_tl, name)


def test_every_export_is_the_documented_object_even_after_every_submodule_is_imported():
    for info in pkgutil.walk_packages(isokl_tl.__path__, "isokl_tl."):
        if ".kernels" not in info.name:              # the Triton kernels need triton
            importlib.import_module(info.name)
    for name in isokl_tl.__all__:
        obj = getattr(isokl_tl, name)
        assert not inspect.ismodule(obj), f"isokl_tl.{name} is a module, not the documented object"
        if callable(obj):
            assert obj.__module__.startswith("isokl_tl"), (name, obj.__module__)
    from isokl_tl import calibrate, plot_survival, rollout, steer
    assert all(inspect.isfunction(f) for f in (rollout, calibrate, steer, plot_survival))
    assert sorted(isokl_tl.__all__) == sorted(set(isokl_tl.__all__))


def test_every_exported_function_runs(tiny, tmp_path):
    api = Api()
    model = api.load_model(api.TINY)
    tok = model.tokenizer
    hook = api.hook_name(2)
    assert api.resolve_hook(model, layer=2) == hook
    pairs = api.load_pairs()[:6]
    prompts = [api.prompt_ids(tok, p) for p in api.load_prompts("calibration")[:3]]
    assert api.load_questions("eval")[0].answer in (True, False)

    d = api.compute_direction(model, pairs, hook, "mean_diff")
    d.save(tmp_path)
    assert torch.equal(api.Direction.load(tmp_path).vector, d.vector)
    x = torch.tensor([prompts[0]])
    base = model(x)
    with api.steer(model, hook, d.vector, 0.0):
        assert torch.equal(model(x), base)                      # c = 0 is the base model
    with d.steer(model, 4.0):
        steered = model(x)
    assert not torch.equal(steered, base) and not model.hook_dict[hook].fwd_hooks
    with api.steer_sites(model, [api.Site(hook, d.vector)], [torch.ones(1)]):
        assert torch.allclose(model(x), model(x))
    assert float(api.token_kl(base, base).abs().max()) == 0.0

    settings = api.CalibrationSettings(window=6, bootstrap=0)
    cal = api.calibrate(model, d, prompts, settings)
    assert isinstance(cal, api.Calibration) and issubclass(api.CalibrationError, ValueError)
    assert api.calibrate_many(model, [d], prompts, settings)[0].c_star == cal.c_star

    coeff = torch.tensor([0.0, 1.0, 2.0]).repeat_interleave(3) * cal.c_star
    r = api.rollout(model, prompts * 3, coeff, direction=d.vector, hook=hook, window=6,
                    alpha=torch.tensor([0.0, 1.0, 2.0]).repeat_interleave(3), sampling=api.Sampling(),
                    record=api.Record(), prompt_index=torch.arange(3).repeat(3))
    assert isinstance(r, api.Rollouts) and isinstance(r.acts, api.Activations)
    row = r.row_ids(3)
    full = torch.tensor([row[0] + row[1]])
    ref = api.teacher_forced_kl(model, full, torch.ones_like(full), len(row[0]), hook=hook, direction=d.vector,
                                coeff=coeff[3:4])
    assert torch.allclose(ref[0, 1:len(row[1])], r.kl[3, 1:len(row[1])], atol=1e-4)

    forks = api.fork_schedule(6, every=3)
    api.answer_token_sets(tok, api.Splice().true_words, api.Splice().false_words)
    pm = api.fork_pmass(model, r, d.vector, forks, api.Splice())
    assert isinstance(pm, api.ForkPMass) and len(pm.frame)
    per_row = api.deaths(pm.frame, api.DeathRule(relative_threshold=0.5, min_base_pmass=1e-9))
    st = api.survival_table(per_row, 6, keep_weak=True)
    assert isinstance(st, api.SurvivalTable)
    km = api.kaplan_meier(time=np.array([3, 6]), event=np.array([True, False]))
    assert isinstance(km, api.SurvivalCurve) and km.n == 2

    figures = [api.plot_calibration(cal), api.plot_spaghetti(r), api.plot_survival(st.curves),
               api.plot_dose_response(st), api.plot_kl_bands(r), api.plot_aggregate(r, pm.frame),
               api.plot_methods({"mean_diff": (r, st.curves, cal.c_star)}),
               api.plot_methods_dose_response({"mean_diff": (st, None, None)})]
    # the key names the death signal the deaths were counted by, the axis the calibration statistic
    keys = [t.get_text() for ax in api.plot_spaghetti(r, death_signal="compression").flat if ax.get_legend()
            for t in ax.get_legend().get_texts()]
    assert "rollout, after its death (compression)" in keys
    import dataclasses
    assert api.plot_calibration(dataclasses.replace(cal, statistic="max")).get_ylabel() == "max per-token KL (nats)"
    study = api.layer_study(model, pairs, prompts, [1, 2], settings=settings)
    assert isinstance(study, api.LayerStudy) and list(study.table.layer) == [1, 2]
    figures.append(api.plot_layers(study.table, study.propagation))
    api.save_figure(figures[0], tmp_path / "calibration.png")
    assert (tmp_path / "calibration.png").stat().st_size > 0
    plt.close("all")

    cfg = api.RunConfig(model=api.TINY, calib_window=6, n_calib=2, bootstrap=0, window=6, n_prompts=2,
                        alphas=(0.0, 1.0), fork_every=3, keep_weak=True)
    run = api.Run(tmp_path / "run", cfg, model=model, progress=False, log=lambda m: None)
    run.run_all()
    assert (tmp_path / "run" / "summary.md").exists()
    api.release(model)

    functions = {n for n in isokl_tl.__all__ if inspect.isfunction(getattr(isokl_tl, n))}
    assert functions <= api.used, f"exported functions this test never called: {sorted(functions - api.used)}"


def test_results_save_and_load(tiny, tiny_direction, tmp_path):
    from isokl_tl import ForkPMass, LayerStudy, SurvivalTable

    study = isokl_tl.layer_study(tiny, isokl_tl.load_pairs()[:6],
                                 [isokl_tl.prompt_ids(tiny.tokenizer, "Hello there")], [1],
                                 settings=isokl_tl.CalibrationSettings(window=6, bootstrap=0))
    study.save(tmp_path / "layers")
    again = LayerStudy.load(tmp_path / "layers")
    assert again.table.drop(columns="error").equals(study.table.drop(columns="error"))
    assert (tmp_path / "layers" / "layers.png").exists()
    cfg = isokl_tl.RunConfig(model=isokl_tl.TINY, calib_window=6, n_calib=2, bootstrap=0, window=6,
                             n_prompts=2, alphas=(0.0, 1.0), fork_every=3, keep_weak=True)
    run = isokl_tl.Run(tmp_path / "run", cfg, model=tiny, progress=False, log=lambda m: None)
    run.run_all()
    pm, st = ForkPMass.load(run.dir), SurvivalTable.load(run.dir)
    assert pm.forks == [0, 3, 6] and pm.splice["mode"] == "interrupt"
    assert st.window == 6 and set(st.curves) == {0.0, 1.0}
    with pytest.raises(ValueError, match="has no pmass.csv"):
        ForkPMass.load(tmp_path)
