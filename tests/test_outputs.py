"""The statement of what a model emits (region_fields) matches what its outputs carry."""
import pytest
import torch

from d2_regionfeat import region_fields
from helpers import build, inputs, make_cfg


def regions_cfg(kind, attributes):
    cfg = make_cfg(kind, selection="regions")
    if attributes:
        cfg.MODEL.ATTRIBUTE_ON = True
        cfg.MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES = 5
    return cfg


@pytest.mark.parametrize("kind,attributes", [("fpn", False), ("c4", True)])
def test_region_outputs_state_the_fields_and_shapes_of_the_outputs(kind, attributes):
    cfg = regions_cfg(kind, attributes)
    model = build(cfg)
    stated = region_fields(model)
    with torch.no_grad():
        out = model(inputs((3, 160, 200)))[0]["instances"]
    assert stated.num_classes == 3 and stated.class_probs and stated.selection == "regions"
    assert stated.num_attributes == (5 if attributes else 0)
    fields = stated.instance_fields()
    assert set(fields) == set(out.get_fields()) - {"pred_boxes", "scores", "pred_classes", "pred_masks"}
    for name, shape in fields.items():
        value = out.get(name)
        assert shape == ("(M,)" if value.dim() == 1 else f"(M, {value.shape[1]})"), name


def test_region_outputs_of_a_plain_model_is_a_one_line_error():
    model = build(make_cfg("fpn", feature=False), wild=True)
    with pytest.raises(ValueError, match="StandardROIHeads gives no region features"):
        region_fields(model)


@pytest.mark.parametrize("kind,attributes", [("fpn", False), ("c4", True)])
def test_records_hold_the_keys_dtypes_and_shapes_of_the_record_spec(kind, attributes):
    """The model call's records: the keys record_keys() states, each as REGION_SPEC says."""
    from d2_regionfeat.extraction.inputs import ImageItem
    from d2_regionfeat.extraction.model_call import BatchExtractor, record_keys
    from d2_regionfeat.formats.records import REGION_SPEC

    cfg = regions_cfg(kind, attributes)
    extractor = BatchExtractor(cfg, fp16=True)
    extractor.model = build(cfg)
    [x] = inputs((3, 160, 200))
    [record] = extractor([dict(x, item=ImageItem("a", "a.png"), height=160, width=200)])
    assert list(record) == record_keys(region_fields(extractor.model))
    for key in REGION_SPEC:
        if key.name not in record or key.shape == "":
            continue
        value = record[key.name]
        assert value.dtype == key.numpy_dtype(fp16=True), key.name
        assert value.ndim == len([d for d in key.shape.strip("()").split(",") if d.strip()]), key.name
        assert len(value) == record["num_bbox"], key.name
