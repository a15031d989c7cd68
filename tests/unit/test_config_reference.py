"""docs/config.md is what the keys' definitions generate, and every key has its help text."""

import dataclasses
from pathlib import Path

import pytest

from fedlora.config import RunConfig, ServerAppSettings
from fedlora.config_reference import config_reference

REFERENCE = Path(__file__).parents[2] / "docs" / "config.md"


def test_docs_config_md_is_generated_from_the_definitions():
    assert REFERENCE.read_text(encoding="utf-8") == config_reference(), (
        "docs/config.md is stale: python -m fedlora.config_reference > docs/config.md"
    )


@pytest.mark.parametrize("settings", [RunConfig, ServerAppSettings])
def test_every_key_is_in_the_reference_with_its_help(settings):
    reference = config_reference()
    for field in dataclasses.fields(settings):
        key = field.name.replace("_", "-")
        assert field.metadata["help"].strip(), key
        assert f"| `{key}` |" in reference
