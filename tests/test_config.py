"""Config files and their presets."""

import pathlib

import cli_runs
import pytest

from gemsjax import config as config_lib
from gemsjax import main
from gemsjax.models import registry
from gemsjax.train import loop, optim

CONFIG_FILES = sorted(p.stem for p in (cli_runs.ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_and_preset_loads(name, shared_data):
    if name == "pmi":
        assert main._load_config_file(f"{cli_runs.ROOT}/configs/pmi.py").fasta_paths == ()
        chrx = main._load_config_file(f"{cli_runs.ROOT}/configs/pmi.py:chrX").fasta_paths
        assert chrx == (str(shared_data / "human_grch37_chrX_0-70Mb" / "hs37chrXtrunc.fa.gz"),)
        assert pathlib.Path(chrx[0]).is_file()
        return
    for preset in ("", "paper", "smoke"):
        config = main._load_config_file(f"{cli_runs.ROOT}/configs/{name}.py:{preset}")
        config_lib.check_config(config)
        assert config.recipe == name
        assert config.data.batch_size % config.train.grad_accum == 0
        assert loop.make_curriculum(config).name
        optim.make_optimizer(config.optimizer, config.train.steps)
        registry.get_model_config(config.model.name)
    config.train.stepz = 1  # e.g. a typo in a config file
    with pytest.raises(config_lib.ConfigKeyError, match="unknown ..train.stepz.*valid keys"):
        config_lib.check_config(config)
