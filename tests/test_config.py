"""Config files and their presets, loading without jax, and the one validation (every refusal)."""

import subprocess
import sys

import cli_runs
import ml_collections
import pytest

from gemsjax import config as config_lib
from gemsjax import curriculum, masking
from gemsjax.errors import UserError
from gemsjax.models import backend, registry
from gemsjax.train import optim

TRAINING = [name for name in config_lib.recipes() if name != "pmi"]
BARCODE = ("barcode_bert", "barcode_mae", "barcode_bert_5m")


def test_the_recipes_are_the_config_files():
    assert config_lib.recipes() == sorted(p.stem for p in (cli_runs.ROOT / "configs").glob("*.py"))
    assert set(TRAINING) == {
        "cm_gems",
        "cm_step",
        "genemask",
        "global_pmi",
        "dnabert_random",
        "barcode_mae",
        "barcode_bert",
        "barcode_bert_5m",
    }


@pytest.mark.parametrize("name", TRAINING)
def test_every_training_config_and_preset_loads(name):
    """Each recipe's presets (its own, a size, key=value) load, validate and build an optimizer
    and a model config; every recipe has :smoke."""
    module = config_lib.load_module(cli_runs.ROOT / "configs" / f"{name}.py")
    assert {"paper", "smoke"} <= set(module.PRESETS)
    for preset in (
        "",
        *module.PRESETS,
        name if name in BARCODE else "dnabert6",
        "smoke,train.steps=7",
    ):
        config = config_lib.load(f"configs/{name}.py:{preset}")
        assert config.recipe == name and config.data.kind == (
            "barcode" if name in BARCODE else "genome"
        )
        optim.make_optimizer(config.optimizer, config.train.steps)
        registry.get_model_config(config.model.name)
    assert config.train.steps == 7 and config.model.name in ("test", "test_mae", "test_k8")
    with pytest.raises(AttributeError):  # loaded configs are locked: no new keys
        config.train.stepz = 1


def test_recipes_state_their_setting():
    """What makes each recipe (read from its file, not from a shared branch)."""
    cm = config_lib.load("cm_gems")
    assert (cm.model.name, cm.masking.curriculum, cm.masking.strategy) == (
        "logo",
        "cm_gems",
        "genemask",
    )
    assert (cm.masking.threshold_mode, cm.masking.threshold) == ("relative", 0.01)
    paper = config_lib.load("cm_gems:paper")
    assert (paper.masking.threshold_mode, paper.masking.threshold) == ("absolute", 1.0)
    assert (paper.data.batch_size, paper.train.grad_accum, paper.train.steps) == (250, 25, 10_000)
    assert paper.optimizer.warmup_steps == 500 and paper.optimizer.learning_rate == 8e-4
    assert config_lib.load("global_pmi").masking.global_pmi_prob == 0.0176
    assert config_lib.load("cm_step:smoke").train.steps == 100
    mae = config_lib.load("barcode_mae")
    assert mae.optimizer.schedule == "onecycle" and mae.optimizer.learning_rate == 1e-4 * 32 / 64
    # bioscan5m_final.sh (c6e9262): --lr 0.00007 per 64 sequences at batch 128, --max-norm 0.5
    mae_paper = config_lib.load("barcode_mae:paper").optimizer
    assert (mae_paper.learning_rate, mae_paper.clip_norm) == (7e-5 * 128 / 64, 0.5)
    assert config_lib.load("barcode_bert").masking.loss_on == "all"


@pytest.mark.parametrize("name", BARCODE)
def test_barcode_recipes_offer_only_the_keys_their_step_reads(name):
    config = config_lib.load(name)
    # mae_draw (and train.mae_visible_slack) are read by the MAE step only
    assert sorted(config.masking) == [
        "loss_on",
        "mae_draw",
        "mae_ratio",
        "mask_frac",
        "random_frac",
        "random_low",
    ]
    assert "mlm_head_share" not in config.train and "fasta" not in config.data
    with pytest.raises(
        config_lib.ConfigKeyError, match=r"unknown config key\(s\) \['masking.strategy'\]"
    ):
        config_lib.load(f"{name}:masking.strategy=genemask")


def test_pmi_config_and_presets(shared_data):
    assert config_lib.load("configs/pmi.py").fasta_paths == ()
    assert config_lib.load("configs/pmi.py:smoke").min_count == 5
    chrx = config_lib.load("configs/pmi.py:chrX").fasta_paths
    assert chrx == (str(shared_data / "human_grch37_chrX_0-70Mb" / "hs37chrXtrunc.fa.gz"),)
    with pytest.raises(UserError, match="unknown preset 'logo'; valid: smoke, chrX, or"):
        config_lib.load("configs/pmi.py:logo")  # sizes are not PMI presets
    with pytest.raises(UserError, match=r"k=0 must be an integer in \[1, 8\]"):
        config_lib.load("configs/pmi.py:k=0")


def test_loading_a_config_imports_no_jax():
    code = (
        "import sys\nfrom gemsjax import config\n"
        "[config.load(f'{n}:{p}') for n in config.recipes() for p in ('', 'smoke')]\n"
        "print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cli_runs.ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_names_match_the_modules_that_use_them():
    """config.py stays free of jax, so it names these itself; they must be the modules' own."""
    assert config_lib.STRATEGIES == masking.STRATEGIES
    assert sorted(config_lib.CURRICULA) == sorted(curriculum.CURRICULA)
    assert config_lib.THRESHOLD_MODES == curriculum.THRESHOLD_MODES
    assert config_lib.ATTENTIONS == backend.ATTENTIONS
    assert config_lib.load("cm_gems:model.attention=fused,model.dropout=0").model.attention
    assert config_lib.SCHEDULES == optim.SCHEDULES and config_lib.DECAY_MASKS == optim.DECAY_MASKS


@pytest.mark.parametrize("kind", ["genome", "barcode"])
def test_every_key_has_a_rule(kind):
    config = config_lib.load("cm_gems" if kind == "genome" else "barcode_mae")
    assert set(config_lib.valid_keys(config)) <= set(config_lib.RULES)
    pmi = config_lib.load("configs/pmi.py")
    assert set(config_lib.valid_keys(pmi)) == set(config_lib.PMI_RULES)


def test_set_key_parses_values_by_the_key_type(tmp_path):
    c = config_lib.load("cm_gems")
    for key, text, want in [
        ("train.steps", "200", 200),
        ("optimizer.learning_rate", "1", 1.0),
        ("data.fasta", "a.fa.gz", ("a.fa.gz",)),
        ("data.fasta", '("a.fa", "b.fa")', ("a.fa", "b.fa")),
        ("masking.rank_table", "123", "123"),
        ("masking.per_example", "4", 4),
        ("masking.per_example", "True", True),
    ]:
        config_lib.set_key(c, key, text)
        got = c.data.fasta if key == "data.fasta" else c[key.split(".")[0]][key.split(".")[1]]
        assert got == want and type(got) is type(want), key


REFUSALS = [  # (presets, what the one-line message must contain)
    ("masking.genemask_prob=1.5", "masking.genemask_prob=1.5 must be a number in [0.0, 1.0]"),
    ("model.init=runs/x", "must be empty (random init) or hf:<transformers model folder>"),
    ("model.init=hf:no/such/folder", "names no transformers model folder (no config.json there)"),
    ("masking.random_span_prob=-0.1", "masking.random_span_prob=-0.1 must be a number in"),
    ("train.eval_every=0", "train.eval_every=0 must be an integer >= 1"),
    ("train.steps=abc", "train.steps='abc' must be an integer >= 1"),
    ("train.steps=2.5", "train.steps=2.5 must be an integer >= 1"),
    ("data.max_len=8", "data.max_len=8 must be in [16, 512]"),
    ("data.max_len=1024", "data.max_len=1024 must be in [16, 512] (the 'logo' size has 512"),
    (
        "data.batch_size=10,train.grad_accum=4",
        "data.batch_size=10 is not divisible by train.grad_accum=4",
    ),
    ("masking.curriculum=cm_gemz", "masking.curriculum='cm_gemz' must be one of 'constant'"),
    ("masking.threshold=0", "masking.threshold=0.0 must be a number > 0.0"),
    ("masking.threshold_mode=percent", "masking.threshold_mode='percent' must be one of"),
    ("masking.mask_frac=0.9,masking.random_frac=0.2", "must be <= 1"),
    ("masking.rank_table=no/such/table.tsv", "must be genemask, fasta or an existing rank-table"),
    ("masking.per_example=0", "masking.per_example=0 must be False"),
    ("masking.loss_on=all", "train.mlm_head_share=0.375 needs masking.loss_on='masked'"),
    ("train.mlm_head_share=1.5", "train.mlm_head_share=1.5 must be a number in [0.0, 1.0]"),
    ("data.fasta=no/such.fa.gz", "data.fasta=('no/such.fa.gz',) names missing file(s)"),
    ("optimizer.warmup_steps=200", "optimizer.warmup_steps=200 must be below train.steps=200"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate=0.0 must be a number > 0.0"),
    ("optimizer.schedule=cosine", "optimizer.schedule='cosine' must be one of"),
    ("train.mesh_data=0", "train.mesh_data=0 must be -1 or >= 1"),
    ("model.name=logo2", "model.name='logo2' must be one of"),
    ("model.dropout=1.0", "model.dropout=1.0 must be -1"),
    ("model.compute_dtype=int8", "model.compute_dtype='int8' must be auto"),
    ("train.stepz=5", "unknown config key(s) ['train.stepz']; valid keys: compile.topology, data."),
    ("train=5", "config key 'train' is not a single value; valid keys: compile.topology"),
    ("papr", "unknown preset 'papr'; valid: paper, smoke, a model size (dnabert6"),
    ("model.attention=fused", "model.attention='fused' with model.dropout=-1.0: the fused kernels"),
    ("model.attention=flash", "model.attention='flash' must be one of"),
]


@pytest.mark.parametrize("presets, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_each_bad_value_is_refused_naming_key_value_and_range(presets, message):
    with pytest.raises(UserError) as refused:
        config_lib.load(f"configs/cm_gems.py:{presets}")
    assert message in str(refused.value)
    assert str(refused.value).startswith(f"configs/cm_gems.py:{presets}: ")
    assert "\n" not in str(refused.value)


def test_barcode_refusals():
    with pytest.raises(UserError, match="is a masked autoencoder: it drops the masked tokens"):
        config_lib.load("barcode_mae:masking.loss_on=all")
    with pytest.raises(UserError, match=r"data.max_len=4 must be in \[8, 512\]"):
        config_lib.load("barcode_bert:data.max_len=4")
    with pytest.raises(UserError, match="data.tsv='nope.tsv' names a file that does not exist"):
        config_lib.load("barcode_bert:data.tsv=nope.tsv")
    with pytest.raises(UserError, match=r"data.train_splits=\(\) must be a non-empty tuple"):
        config_lib.load("barcode_bert:data.train_splits=()")


def test_a_config_file_with_a_typo_or_a_missing_key_is_refused(tmp_path):
    """A key a config file adds or drops is named, with the valid keys."""
    source = (cli_runs.ROOT / "configs" / "genemask.py").read_text()
    added = tmp_path / "typo.py"
    added.write_text(
        source.replace(
            "    return base.apply_presets", "    c.train.stepz = 1\n    return base.apply_presets"
        )
    )
    with pytest.raises(
        config_lib.ConfigKeyError,
        match=r"unknown config key\(s\) \['train.stepz'\]; valid keys: .*data",
    ):
        config_lib.load(str(added))
    dropped = tmp_path / "dropped.py"
    dropped.write_text(
        source.replace(
            "    return base.apply_presets",
            "    del c.masking['loss_on']\n    return base.apply_presets",
        )
    )
    with pytest.raises(
        config_lib.ConfigKeyError, match=r"missing config key\(s\) \['masking.loss_on'\]"
    ):
        config_lib.load(str(dropped))
    with pytest.raises(
        UserError,
        match="config file 'configs/nope.py' not found; recipes in "
        "configs/: barcode_bert, barcode_bert_5m, barcode_mae",
    ):
        config_lib.load("configs/nope.py")


def test_validate_takes_plain_config_dicts():
    """``train_and_evaluate`` validates what it is given: a hand-built config is held to the
    same schema and ranges."""
    config = ml_collections.ConfigDict(config_lib.load("genemask:smoke").to_dict())
    config_lib.validate(config)
    config.data.fasta = ["missing.fa"]
    with pytest.raises(UserError, match=r"config: data.fasta=\('missing.fa',\) names missing"):
        config_lib.validate(config)


def test_downstream_configs_get_the_same_key_check(tmp_path):
    """configs/eval/ files and their --config.<key> overrides go through config.check_keys too:
    a misspelled key on the command line or a key a file adds is one error naming the key."""
    from gemsjax.eval import config as eval_config

    with pytest.raises(
        config_lib.ConfigKeyError,
        match=r"fewshot:smoke: unknown config key\(s\) \['drawz'\]; valid keys: baseline, draws",
    ):
        eval_config.load("fewshot:smoke", {"drawz": "3"}, "evaluate")
    source = (config_lib.CONFIGS_DIR / "eval" / "gue.py").read_text()
    added = tmp_path / "gue_typo.py"
    added.write_text(
        source + "\n\n_gue = get_config\n\n\ndef get_config(arg=None):\n"
        "    c = _gue(arg)\n    c.max_eval_rowz = 5\n    return c\n"
    )
    with pytest.raises(
        config_lib.ConfigKeyError, match=r"unknown config key\(s\) \['max_eval_rowz'\]"
    ):
        eval_config.load(str(added), {}, "evaluate")
