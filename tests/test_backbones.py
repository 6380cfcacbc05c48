"""The bases table: every row builds (weights=None) with its declared feature size.

The models are built in a Keras ``StatelessScope`` that leaves variables uninitialised: every layer is
built and every variable declared with its shape, but no initial value is drawn (drawing them was about
three quarters of the CPU time of building a base, and the values are not what these tests check)."""

from __future__ import annotations

import pytest

from pipeline.nets import backbones
from pipeline.core.errors import UsageError


def _declared_only():
    """Variables declared (shape, dtype, initializer) but not initialised (keras.backend.clear_session
    forgets them)."""
    from keras import StatelessScope

    return StatelessScope(initialize_variables=False)


@pytest.mark.parametrize("name", backbones.names())
def test_every_base_builds_with_declared_feature_size(name):
    import keras

    b = backbones.get_backbone(name)
    with _declared_only():
        model = b.build(None, input_size=max(b.min_size, 32))
    assert model.output_shape == (None, b.feature_size)
    assert not model.trainable
    assert callable(b.preprocess_input)
    keras.backend.clear_session()


def test_aliases_and_unknown_names():
    assert backbones.get_backbone("googlenet").name == "inception_v3"
    assert backbones.get_backbone("GoogLeNet").constructor == "InceptionV3"
    assert backbones.get_backbone("ResNet50").name == "resnet50"
    assert backbones.get_backbone("mobilenet_0.75").kwargs == {"alpha": 0.75}
    with pytest.raises(UsageError) as err:
        backbones.get_backbone("resnet51")
    msg = str(err.value)
    assert "unknown base 'resnet51'" in msg
    for valid in ("vgg16", "inception_v3", "resnet50", "efficientnet_b7", "convnext_xlarge"):
        assert valid in msg


def test_table_covers_every_keras_applications_family():
    import keras

    constructors = {b.constructor for b in backbones.BACKBONES.values()}
    public = {n for n in dir(keras.applications) if n[0].isupper()}
    assert public <= constructors, f"missing rows for {sorted(public - constructors)}"


@pytest.mark.parametrize("name", ["vgg16", "mobilenet_0.75", "efficientnet_b0", "inception_v3"])
def test_weights_file_column_matches_what_keras_fetches(name, monkeypatch):
    """The cache file name in the table is the one keras.applications asks get_file for."""
    import keras
    from keras.src.utils import file_utils

    asked = {}

    class Stop(Exception):
        pass

    def fake_get_file(fname=None, origin=None, **kwargs):
        asked["fname"] = fname
        raise Stop

    monkeypatch.setattr(file_utils, "get_file", fake_get_file)
    b = backbones.get_backbone(name)
    with pytest.raises(Stop), _declared_only():
        b.build("imagenet")
    keras.backend.clear_session()
    assert asked["fname"] == b.weights_file
