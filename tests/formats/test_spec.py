"""formats/spec: the packed format's per-module record reads and writes exactly the JSON of docs/FORMAT.md."""

import json

import pytest

from moecompress.formats.spec import ModuleSpec, module_specs
from moecompress.types import Activation

LINEAR = {"type": "linear", "codec": "int4", "shape": [1, 256, 256], "group_size": 128, "symmetric": False,
          "bias": False}
EXPERTS = {"type": "experts", "shape": [8, 256, 256],
           "codecs": {"gate": "ternary-b3", "up": "ternary-b3", "down": "ternary-b3"},
           "group_size": 128, "symmetric": True, "bias": False,
           "activation": {"kind": "glu", "fn": "silu", "alpha": 1.702, "limit": 7.0},
           "intermediate_rotation_seed": None}


@pytest.mark.parametrize("entry", [LINEAR, EXPERTS, {**EXPERTS, "bias": True, "intermediate_rotation_seed": 3,
                                                     "codecs": {"gate": "int4", "up": "int4", "down": "int8"}}])
def test_round_trip_is_the_same_json(entry):
    spec = ModuleSpec.from_dict(entry)
    assert spec.to_dict() == entry
    assert json.dumps(spec.to_dict(), sort_keys=True) == json.dumps(entry, sort_keys=True)
    assert ModuleSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_typed_fields():
    specs = module_specs({"a.q_proj": LINEAR, "a.experts": EXPERTS})
    lin, exp = specs["a.q_proj"], specs["a.experts"]
    assert lin.shape == (1, 256, 256) and lin.all_codecs == ("int4",) and lin.activation is None
    assert exp.activation == Activation("glu", "silu") and exp.all_codecs == ("ternary-b3",) * 3
    assert exp == ModuleSpec.experts((8, 256, 256), EXPERTS["codecs"], 128, True, False, Activation())


def test_malformed_entries_raise():
    with pytest.raises(ValueError, match="unknown packed module type 'conv'"):
        ModuleSpec.from_dict({**LINEAR, "type": "conv"})
    with pytest.raises(KeyError):
        ModuleSpec.from_dict({k: v for k, v in LINEAR.items() if k != "codec"})
