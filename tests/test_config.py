"""Config: presets load, overrides are typed, unknown keys and bad values name themselves."""

import pytest

from conftest import preset
from liverseg import config
from liverseg.config import ConfigError


@pytest.mark.parametrize("name", ["default", "seed", "smoke", "demo", "real-cpu"])
def test_presets_load(name):
    cfg = config.load(preset(name))
    assert config.from_dict(config.to_dict(cfg)) == cfg  # round trip through the saved form


def test_the_real_cpu_recipe_names_the_convert_flags_its_records_need():
    first = (preset("real-cpu")).read_text().splitlines()[0]
    assert first == "# convert: --layout list --spacing 2.0 --size 192"
    from liverseg.manifest import ConvertOptions

    flags = first.removeprefix("# convert: ").split()
    known = {"--" + name.replace("_", "-") for name in ConvertOptions.__dataclass_fields__}
    assert all(f in known for f in flags if f.startswith("--"))
    cfg = config.load(preset("real-cpu"))
    assert cfg.data.source_weights == {"real": 0.6, "phantom": 0.4} and cfg.eval.min_component_fraction == 1.0


def test_seed_preset_is_the_tutorials_recipe():
    cfg = config.load(preset("seed"))
    assert (
        cfg.model.name,
        cfg.train.loss,
        cfg.train.optimizer,
        cfg.train.lr,
        cfg.data.batch_size,
        cfg.augment.placement,
    ) == ("seed_unet", "bce", "adam", 0.001, 1, "none")


def test_dotted_overrides_are_parsed_and_typed():
    cfg = config.load(None, ["train.lr=3e-4", "data.hu_window=[-100, 200]", "augment.placement=device", "seed=7"])
    assert cfg.train.lr == 3e-4 and cfg.data.hu_window == (-100.0, 200.0) and cfg.seed == 7
    assert cfg.augment.placement == "device"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.nope=1", r"unknown config key train.nope \(valid keys at train: steps, time_budget_min, strategy"),
        ("nope.x=1", r"unknown config key nope \(valid keys at top level: seed"),
        ("train.steps=ten", r"train.steps='ten' must be an integer"),
        ("train.loss=mse", r"train.loss='mse' is not valid; choose one of: bce, dice, bce_dice, focal, tversky"),
        ("data.hu_window=[300, 100]", r"data.hu_window=\(300.0, 100.0\) is not valid: needs -1024 <= low < high"),
        ("augment.gamma_p=1.5", r"augment.gamma_p=1.5 is not valid: a probability"),
        ("deterministic=1", r"deterministic=1 must be true or false"),
        ("train", r"override 'train' must look like section.key=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, [override])


def test_deterministic_runs_refuse_xla():
    with pytest.raises(
        ConfigError, match=r"deterministic=True is not valid: cannot be combined with train.jit_compile"
    ):
        config.load(preset("default"), ["deterministic=true"])
    assert config.load(preset("default"), ["deterministic=true", "train.jit_compile=false"]).deterministic


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing here yet\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml holds no settings; give a recipe"):
        config.load(tmp_path / "empty.yaml")
    for odd in ("/dev/zero", tmp_path):
        with pytest.raises(ConfigError, match=rf"config file {odd} is not a regular file"):
            config.load(odd)


@pytest.mark.parametrize(
    "override, message",
    [
        ("augment.rotation_deg=.nan", "augment.rotation_deg=nan must be a finite number"),
        ("train.lr=.inf", "train.lr=inf must be a finite number"),
        (
            "data.hu_window=[-1e308, 1e308]",
            "data.hu_window=(-1e+308, 1e+308) is not valid: needs -1024 <= low < high <= 3071",
        ),
        ("seed=-1", "seed=-1 is not valid: must be in [0, 2**31)"),
        ("seed=4294967296", "seed=4294967296 is not valid"),
        ("augment.elastic_sigma=0", "augment.elastic_sigma=0.0 is not valid: must be in [1, 1000] pixels"),
        ("train.num_images=-1", "train.num_images=-1 is not valid: must be in [0, 64]"),
        ("model.base_filters=100000", "model.base_filters=100000 is not valid: must be in [1, 512]"),
        (
            "data.shuffle_buffer=1000000000000",
            "data.shuffle_buffer=1000000000000 is not valid: must be in [1, 1048576]",
        ),
        ("data.batch_size=1000000000", "data.batch_size=1000000000 is not valid: must be in [1, 65536]"),
    ],
)
def test_absurd_and_non_finite_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert message in str(e.value)
