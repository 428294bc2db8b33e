"""Every shipped recipe validates against the stage registry and the model it names."""

from pathlib import Path

import pytest

from moecompress.models import find_arch
from moecompress.recipe import load_recipe
from moecompress.io.model import load_config

RECIPES = sorted(Path(__file__).resolve().parents[1].glob("recipes/**/*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_validates(path):
    recipe = load_recipe(path)
    config = load_config(recipe.model)
    arch = find_arch(config)
    for stage in recipe.stages:
        stage.check(config, arch)
