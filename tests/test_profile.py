"""Params profiles (profiles/*.yaml): checked before they run, and applied by DVC exactly as merged."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from stages.params import ConfigError
from stages.profile import _expand_same_as, main, merged, set_param_arguments

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
FULL = ROOT / "profiles" / "full.yaml"
SEEDS = ROOT / "profiles" / "seeds.yaml"


def _apply_with_dvc(params: Path, arguments: list[str]) -> dict:
    """What ``dvc exp run`` does with ``--set-param`` arguments: DVC's own override parser."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(params, [a.removeprefix("--set-param=") for a in arguments])
    return yaml.safe_load(params.read_text())


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_dvc_applies_each_profile_as_merged(tmp_path: Path, profile: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    arguments = set_param_arguments(profile, params)
    assert arguments and all(a.startswith("--set-param=") and " " not in a for a in arguments)
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    want = merged(base, _expand_same_as(yaml.safe_load(profile.read_text()), base))
    assert _apply_with_dvc(params, arguments) == want
    assert "# Parameters of every stage" in params.read_text()  # comments kept


def _numbers(over: dict, base: dict, prefix: str = ""):
    for key, value in over.items():
        if key not in base:
            continue  # a new entry (a recipe of seeds) only adds work
        if isinstance(value, dict):
            yield from _numbers(value, base[key], f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value, base[key]
        elif isinstance(value, list):
            yield f"{prefix}{key} (length)", len(value), len(base[key])


def test_full_profile_only_adds_work() -> None:
    """Every count the full study sets (items, draws, grid sizes, epochs) is at least the
    default's (a ``null`` item limit, every item, is more than any)."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    counts = list(_numbers(yaml.safe_load(FULL.read_text()), base))
    # models studied, ablation and evaluate items, deletion-curve sizes, random draws, steering epochs
    assert len(counts) >= 6
    less = [(key, value, default) for key, value, default in counts if default is not None and value < default]
    assert not less, f"the full profile makes these smaller than the default: {less}"


def test_the_seeds_profile_studies_every_shipped_seed_of_each_family() -> None:
    """profiles/seeds.yaml: the shipped instances, each family's seeds one recipe (entries equal
    but for the seed), and the exhaustive ground truth with its masks evaluated."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert base["replicates"] == {} and len(base["studied_models"]) == 2  # the default: one seed per family
    params = merged(base, _expand_same_as(yaml.safe_load(SEEDS.read_text()), base))
    shipped = sorted(p.name for p in (ROOT / "data" / "shipped").iterdir() if p.is_dir())
    assert sorted(params["studied_models"]) == sorted(params["shipped_models"]) == shipped
    assert sorted(m for ms in params["replicates"].values() for m in ms) == shipped
    for recipe, instances in params["replicates"].items():
        entries = [{k: v for k, v in params["models"][m].items() if k != "seed"} for m in instances]
        assert len(instances) == 3 and all(e == entries[0] for e in entries), recipe
        assert len({params["models"][m]["seed"] for m in instances}) == 3, recipe
    assert params["ablation"]["enabled"] and "ablation" in params["evaluate"]["methods"]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("heads:\n  max_itms: 4\n", "heads.max_itms"),
        ("models:\n  tiny-llava:\n    steps: 0\n", "steps"),
        ("evaluate:\n  split: nowhere\n", "split"),
        ("nosection:\n  x: 1\n", "nosection"),
        ("heads: {}\n", "sets no key"),
    ],
)
def test_a_bad_profile_is_refused_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text(text)
    with pytest.raises(ConfigError, match=named) as caught:
        set_param_arguments(profile, ROOT / "params.yaml")
    assert str(profile) in str(caught.value)


def test_command_line_exits_2_with_the_reason(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    assert main(["missing"]) == 2
    assert "profile not found: profiles/missing.yaml" in capsys.readouterr().err


def test_an_empty_mapping_empties_an_extendable_section(tmp_path: Path) -> None:
    """DVC merges a mapping override into a mapping: ``replicates: {}`` must still empty it."""
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    _apply_with_dvc(params, set_param_arguments(SEEDS, params))
    assert yaml.safe_load(params.read_text())["replicates"]  # the seeds profile replicates its recipes
    profile = tmp_path / "p.yaml"
    profile.write_text("studied_models: [tiny-llava]\nshipped_models: [tiny-llava]\nreplicates: {}\n")
    arguments = set_param_arguments(profile, params)
    assert arguments[-2:] == ["--set-param=~replicates", "--set-param=+replicates={}"]
    assert _apply_with_dvc(params, arguments)["replicates"] == {}
    profile.write_text("heads: {}\n")  # not an extendable section: an empty mapping sets nothing
    with pytest.raises(ConfigError, match="sets no key"):
        set_param_arguments(profile, params)


def test_a_profile_adds_seeds_of_a_recipe_as_the_profile_leaves_it(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "models:\n  tiny-llava: {steps: 7}\n  tiny-llava-s9: {same_as: tiny-llava, seed: 9}\n"
        "replicates: {r: [tiny-llava]}\n"
    )
    arguments = set_param_arguments(profile, params)
    assert (
        "--set-param=+models.tiny-llava-s9.seed=9" in arguments
        and "--set-param=+replicates.r=[tiny-llava]" in arguments
    )
    got = _apply_with_dvc(params, arguments)
    assert got["models"]["tiny-llava-s9"] == {**got["models"]["tiny-llava"], "seed": 9}
    assert got["models"]["tiny-llava-s9"]["steps"] == 7 and got["replicates"]["r"] == ["tiny-llava"]
    profile.write_text("models:\n  x: {same_as: no-such-model}\n")
    with pytest.raises(ConfigError, match="models.x.same_as: 'no-such-model' is not a model"):
        set_param_arguments(profile, params)
    profile.write_text("heads:\n  new_key: 1\n")
    with pytest.raises(ConfigError, match="profile key 'heads.new_key' is not in params.yaml"):
        set_param_arguments(profile, params)
