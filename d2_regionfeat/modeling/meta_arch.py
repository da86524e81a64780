"""A GeneralizedRCNN whose box predictor knows each image's original size at inference."""
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN


@META_ARCH_REGISTRY.register()
class RegionFeatureRCNN(GeneralizedRCNN):
    """
    :class:`GeneralizedRCNN` (same parameters, training and outputs) that tells the Feature
    heads' box predictor the original (height, width) of every input image during inference:
    ``MODEL.REGION_FEATURES.SELECTION: "butd"`` runs its NMS in original image pixels, as
    bottom-up-attention's ``generate_tsv.py`` does, where the ``+1`` of its IoU is not
    invariant to the resize.
    """

    def inference(self, batched_inputs, detected_instances=None, do_postprocess=True):
        shapes = [
            (x.get("height", x["image"].shape[-2]), x.get("width", x["image"].shape[-1]))
            for x in batched_inputs
        ]
        with self.roi_heads.output_shapes(shapes):
            return super().inference(batched_inputs, detected_instances, do_postprocess)
