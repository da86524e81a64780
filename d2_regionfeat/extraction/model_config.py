"""
How every tool loads the config of its model: :func:`load_model_config` takes the file you
trained with, whichever of detectron2's two config systems wrote it, with overrides in that
system's own form, and gives a :class:`ModelConfig` enabled for region features.

* a yacs YAML (``_BASE_`` chains, the model zoo's files as they are), overrides ``KEY VALUE``
  pairs (``CfgNode.merge_from_list``); weights ``MODEL.WEIGHTS``, device ``MODEL.DEVICE``;
* a LazyConfig ``.py`` or a ``.yaml`` written by ``LazyConfig.save``, overrides ``key=value``
  (``LazyConfig.apply_overrides``, as ``lazyconfig_train_net.py`` takes them); weights
  ``train.init_checkpoint``, device ``train.device``; the region-feature settings are the
  keys of the :data:`REGION_FEATURES` namespace (``region_features.selection=butd``).

The kind is told by the file itself: ``.py`` is a LazyConfig, a YAML is one when its
``model`` holds a ``_target_``, yacs otherwise. A config with plain ROI heads is switched to
their region-feature version by :func:`~d2_regionfeat.modeling.enable.enable_region_features`,
and one INFO line says what changed.
"""
import copy
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import yaml

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_model
from detectron2.utils.file_io import PathManager

from ..data.transforms import AugmentationChain, build_test_transform
from ..modeling.config import check_region_settings
from ..modeling.enable import enable_region_features, is_feature_predictor, lazy_box_predictor
from ..modeling.given_boxes import RegionPredictor
from ..modeling.meta_arch import check_built_model
from ..modeling.vocabulary import Vocabularies, vocabularies
from .inputs import one_line
from .manifest import sha256_file, sha256_text

logger = logging.getLogger(__name__)

YACS, LAZY = "yacs", "lazy"
# The LazyConfig namespace of region-feature settings, key -> what it sets (None: the config's
# own value is kept). Each is an argument of the wrapped ROI heads or of their last box
# predictor; ``score_thresh`` is that predictor's ``test_score_thresh``.
REGION_FEATURES = {
    "region_source": "roi_heads.region_source: box_head or pooled (MODEL.REGION_FEATURES.SOURCE)",
    "pool_at": "roi_heads.pool_at: proposal or final",
    "source_module": "roi_heads.source_module: a dotted module path under the heads, or ''",
    "selection": "box predictor: detections, regions, butd or vinvl",
    "class_probs": "box predictor: class_probs (K+1 softmax) in detections mode",
    "conf_thresh": "box predictor: regions/butd score threshold",
    "min_boxes": "box predictor: regions/butd least regions",
    "max_boxes": "box predictor: regions/butd most regions",
    "region_box": "box predictor: regions-mode box, proposal or regressed",
    "min_regions": "box predictor: at least this many regions per image",
    "num_attributes": "box predictor: A, the attribute head's attributes (0: none)",
    "score_thresh": "box predictor: test_score_thresh of detections mode",
}
_HEAD_KEYS = ("region_source", "pool_at", "source_module")
# The keys of a setting in each form (yacs key, or the REGION_FEATURES key), for tools that
# turn their own flags into overrides (see :func:`setting_overrides`).
SETTINGS = {
    "min_regions": ("MODEL.REGION_FEATURES.MIN_REGIONS", "min_regions"),
    "class_probs": ("MODEL.REGION_FEATURES.CLASS_PROBS", "class_probs"),
    "score_thresh": ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "score_thresh"),
}
OVERRIDES_HELP = (
    "config overrides after the options, in the config's own form: KEY VALUE pairs for a yacs "
    "YAML (MODEL.WEIGHTS model.pth MODEL.REGION_FEATURES.SELECTION butd), key=value for a "
    "LazyConfig (train.init_checkpoint=model.pth region_features.selection=butd)"
)


_YACS_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+")


def split_overrides(words: Sequence[str]):
    """
    ``(words before, overrides)``: ``words`` cut at the first config override (a yacs
    ``KEY.PATH`` or a LazyConfig ``key=value``), for an option of many words (``--format npz
    tsv``, ``--input a.jpg b.jpg``) that the trailing overrides ran into.
    """
    end = next((i for i, w in enumerate(words) if "=" in w or _YACS_KEY.fullmatch(w)), len(words))
    return list(words[:end]), list(words[end:])


def add_config_arguments(parser, config_file=None):
    """
    Give ``parser`` the config arguments every tool takes (those it has get their help):
    ``--config-file`` (default ``config_file``; required without one), ``--weights``,
    ``--device`` and the trailing overrides ``opts`` (see :data:`OVERRIDES_HELP`).
    """
    actions = {a.dest: a for a in parser._actions}
    arguments = {
        "config_file": (["--config-file"], dict(
            metavar="FILE", default=config_file, required=config_file is None,
            help="the model's config: a yacs YAML (_BASE_ chains, model zoo files) or a LazyConfig "
            ".py / saved .yaml" + (" (default: the shipped model)" if config_file else ""))),
        "weights": (["--weights"], dict(
            help="the checkpoint (in place of MODEL.WEIGHTS / train.init_checkpoint)")),
        "device": (["--device"], dict(
            help="the device (in place of MODEL.DEVICE / train.device; cpu without CUDA)")),
        "opts": (["opts"], dict(nargs="...", default=[], metavar="OVERRIDES", help=OVERRIDES_HELP)),
    }
    for dest, (flags, options) in arguments.items():
        if dest not in actions:
            parser.add_argument(*flags, **options)
            continue
        for key in ("help", "metavar", "default", "required"):
            if key in options:
                setattr(actions[dest], key, options[key])
    return parser


def model_config_from_args(args, overrides=(), **settings) -> "ModelConfig":
    """
    :func:`load_model_config` of the arguments of :func:`add_config_arguments`: ``args.opts``,
    then ``overrides``, then the tool's own :data:`SETTINGS` (None: left alone).
    """
    settings = {k: v for k, v in settings.items() if v is not None}
    overrides = list(args.opts) + list(overrides) + setting_overrides(args.config_file, **settings)
    return load_model_config(args.config_file, overrides, args.weights, args.device)


class ConfigError(ValueError):
    """A config file or override that cannot be used, as one line."""


def config_kind(path: str) -> str:
    """:data:`YACS` or :data:`LAZY`, by what the file at ``path`` is (ConfigError: neither)."""
    extension = os.path.splitext(path)[1]
    if not PathManager.isfile(path):
        raise ConfigError(f"--config-file {path} not found")
    if extension == ".py":
        return LAZY
    if extension in (".yaml", ".yml"):
        try:
            with PathManager.open(path) as f:
                content = yaml.unsafe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config-file {path} is not valid YAML ({' '.join(str(e).split())})")
        if isinstance(content, dict):
            model = content.get("model")
            return LAZY if isinstance(model, dict) and "_target_" in model else YACS
    raise ConfigError(
        f"--config-file {path} is neither a yacs YAML nor a LazyConfig (.py, or .yaml from LazyConfig.save)"
    )


def setting_overrides(path: str, **settings) -> List[str]:
    """Overrides, in the form of the config at ``path``, that set :data:`SETTINGS` to values."""
    lazy = config_kind(path) == LAZY
    overrides = []
    for name, value in settings.items():
        yacs_key, lazy_key = SETTINGS[name]
        overrides += [f"region_features.{lazy_key}={value}"] if lazy else [yacs_key, str(value)]
    return overrides


@dataclass
class ModelConfig:
    """
    A model's config, loaded by :func:`load_model_config` and enabled for region features.

    ``cfg`` is the ``CfgNode`` (yacs) or ``DictConfig`` (LazyConfig); ``text`` the file as
    given, ``overrides`` as given, ``resolved`` the config in full after them (yacs dump, or
    the yaml of ``LazyConfig.save``) and ``sha256`` its checksum less device and weights.
    """

    kind: str
    path: str
    cfg: object
    text: str
    overrides: List[str]
    resolved: str
    sha256: str
    weights: str
    device: str
    input_format: str
    changes: Dict[str, str] = field(default_factory=dict)

    def build_model(self, device: Optional[str] = None) -> torch.nn.Module:
        """The model, in eval mode, on ``device`` (default: its own), without weights."""
        device = device or self.device
        if self.kind == YACS:
            cfg = self.cfg.clone()
            cfg.defrost()
            cfg.MODEL.DEVICE = device
            return build_model(cfg).eval()
        model = instantiate(copy.deepcopy(self.cfg.model)).to(device).eval()
        check_built_model(model)  # a LazyConfig's heads cannot see their meta-architecture
        return model

    def predictor(self) -> RegionPredictor:
        """A :class:`RegionPredictor` of the model with its weights, on its device."""
        model = self.build_model()
        self.load_weights(model)
        return RegionPredictor.of_model(model, self.input_format, self.test_transform())

    def test_transform(self) -> T.Augmentation:
        """
        The resize of the model's test input: :func:`~d2_regionfeat.data.build_test_transform`
        of a yacs config; a LazyConfig's ``dataloader.test.mapper.augmentations`` (what its own
        test loader applies), or detectron2's default resize where it has none.
        """
        if self.kind == YACS:
            return build_test_transform(self.cfg)
        return _lazy_test_transform(self.cfg)

    def local_weights(self) -> str:
        """The weights as a local file (fetched through detectron2's PathManager)."""
        if not self.weights:
            key = "MODEL.WEIGHTS" if self.kind == YACS else "train.init_checkpoint"
            raise ConfigError(f"{key} is not set: give the checkpoint to extract with (or --weights)")
        try:
            path = PathManager.get_local_path(self.weights)
        except Exception as e:  # any handler (http, detectron2://, ...) may fail its own way
            raise ConfigError(f"weights {self.weights} cannot be fetched ({one_line(e)})")
        if not os.path.isfile(path):
            raise ConfigError(f"weights file {self.weights} not found")
        return path

    def load_weights(self, model: torch.nn.Module):
        """Load the weights into ``model`` (a model of :meth:`build_model`; none when unset)."""
        DetectionCheckpointer(model).load(self.weights)

    def vocabularies(self) -> Vocabularies:
        """The model's class and attribute names (see :func:`modeling.vocabulary.vocabularies`)."""
        if self.kind == YACS:
            return vocabularies(self.cfg)
        from omegaconf import OmegaConf

        datasets = OmegaConf.select(self.cfg, "dataloader.test.dataset.names", default=None)
        num_classes = OmegaConf.select(self.cfg, "model.roi_heads.num_classes", default=None)
        names = None
        for dataset in [datasets] if isinstance(datasets, str) else list(datasets or ()):
            registered = MetadataCatalog.get(dataset).get("thing_classes")
            if registered and len(registered) == num_classes:
                names = list(registered)
                break
        return Vocabularies(names, None)

    def identity(self) -> Dict:
        """
        What of the config decides the features, as every manifest stores it and ``--resume``
        compares it: the file's text and the overrides as given, the resolved config's
        ``config_sha256`` (less device and weights), the weights and their ``weights_sha256``.
        """
        return {
            "config_text": self.text,
            "config_overrides": list(self.overrides),
            "config_sha256": self.sha256,
            "weights": self.weights,
            "weights_sha256": sha256_file(self.local_weights()),
        }

    def manifest_entries(self) -> Dict:
        """What a folder run's manifest stores about the config: :meth:`identity`, and more."""
        return {
            "config_kind": self.kind, "config_file": self.path, "config": self.resolved, **self.identity()
        }


def load_model_config(path: str, overrides: Sequence[str] = (), weights: Optional[str] = None,
                      device: Optional[str] = None) -> ModelConfig:
    """
    Load the config at ``path`` (kind by :func:`config_kind`), apply ``overrides`` in its own
    form, and enable it for region features.

    Args:
        weights: the checkpoint, in place of ``MODEL.WEIGHTS`` / ``train.init_checkpoint``.
        device: in place of ``MODEL.DEVICE`` / ``train.device``; by default the config's, or
            "cpu" for a CUDA device without CUDA.

    Raises:
        ConfigError: naming the file, the override or the head that is wrong (one line).
    """
    kind = config_kind(path)
    with PathManager.open(path) as f:
        text = f.read()
    overrides = list(overrides)
    load = _load_yacs if kind == YACS else _load_lazy
    return load(path, text, overrides, weights, device)


def model_config_of(cfg: CfgNode) -> ModelConfig:
    """A :class:`ModelConfig` of a yacs config built in code (no file: no text; its resolved dump)."""
    return _yacs_model_config("", "", [], _enabled_yacs(cfg), None, None)


def as_model_config(cfg) -> ModelConfig:
    """``cfg`` itself when a :class:`ModelConfig`, else :func:`model_config_of` a ``CfgNode``."""
    return cfg if isinstance(cfg, ModelConfig) else model_config_of(cfg)


def _device(device, configured):
    if device:
        return device
    return "cpu" if configured.startswith("cuda") and not torch.cuda.is_available() else configured


def _load_yacs(path, text, overrides, weights, device):
    cfg = get_cfg()
    try:
        cfg.merge_from_file(path)
    except (OSError, KeyError, ValueError, AssertionError, yaml.YAMLError) as e:
        raise ConfigError(f"config {path}: {' '.join(str(e.args[0] if e.args else e).split())}")
    if any("=" in o for o in overrides[::2]):
        raise ConfigError(
            f"config {path} is a yacs YAML: its overrides are KEY VALUE pairs, not key=value "
            f"({' '.join(overrides)})"
        )
    try:
        cfg.merge_from_list(overrides)
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"config options {' '.join(overrides)}: {e.args[0] if e.args else e}")
    return _yacs_model_config(path, text, overrides, _enabled_yacs(cfg), weights, device)


def _enabled_yacs(cfg):
    meta_arch = cfg.MODEL.META_ARCHITECTURE
    try:
        is_rcnn = issubclass(META_ARCH_REGISTRY.get(meta_arch), GeneralizedRCNN)
    except KeyError:
        raise ConfigError(f"MODEL.META_ARCHITECTURE {meta_arch!r} is not registered") from None
    if not is_rcnn:
        raise ConfigError(
            f"MODEL.META_ARCHITECTURE {meta_arch} has no ROI heads to give region features "
            "(they need an R-CNN: GeneralizedRCNN or a subclass)"
        )
    try:
        enabled = enable_region_features(cfg)
    except ValueError as e:
        raise ConfigError(one_line(e).split(": ", 1)[1])
    changes = _changes(_flat(yaml.safe_load(cfg.dump())), _flat(yaml.safe_load(enabled.dump())))
    _log_enabling(cfg.MODEL.ROI_HEADS.NAME, changes)
    return enabled, changes


def _yacs_model_config(path, text, overrides, enabled, weights, device):
    cfg, changes = enabled
    cfg = cfg.clone()  # the caller's is left as it is
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights or cfg.MODEL.WEIGHTS
    cfg.MODEL.DEVICE = _device(device, cfg.MODEL.DEVICE)
    cfg.freeze()
    identity = cfg.clone()
    identity.defrost()
    identity.MODEL.DEVICE = identity.MODEL.WEIGHTS = ""
    return ModelConfig(
        kind=YACS, path=path, cfg=cfg, text=text, overrides=overrides, resolved=cfg.dump(),
        sha256=sha256_text(identity.dump()), weights=cfg.MODEL.WEIGHTS, device=cfg.MODEL.DEVICE,
        input_format=cfg.INPUT.FORMAT, changes=changes,
    )


def _flat(node, prefix=""):
    """A nested dict/list config as {dotted key: value}, classes and functions by their names."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, (list, tuple)):
        items = enumerate(node)
    else:
        return {prefix[:-1]: _callable_name(node) if callable(node) else node}
    flat = {}
    for key, value in items:
        flat.update(_flat(value, f"{prefix}{key}."))
    return flat


def _callable_name(node) -> str:
    """A class's or function's dotted name; the repr of other callables (a functools.partial)."""
    name = getattr(node, "__qualname__", None)
    return f"{node.__module__}.{name}" if name else repr(node)


def _changes(before: Dict, after: Dict) -> Dict[str, str]:
    """{key: "old -> new"} of the keys whose value differs."""
    return {k: f"{before.get(k)} -> {after[k]}" for k in after if before.get(k) != after[k]}


def _log_enabling(head, changes):
    if changes:
        logger.info(
            f"region features: {head} wrapped; changed {'; '.join(f'{k} {v}' for k, v in changes.items())}"
        )


def _lazy_flat(cfg):
    from omegaconf import OmegaConf

    return _flat(OmegaConf.to_container(cfg, resolve=False))


def _load_lazy(path, text, overrides, weights, device):
    from omegaconf import OmegaConf

    try:
        cfg = LazyConfig.load(path)
    except Exception as e:  # a .py config runs user code: any error is the file's
        raise ConfigError(f"config {path}: {one_line(e)}")
    settings = {key: None for key in REGION_FEATURES}
    settings.update(OmegaConf.to_container(cfg.get("region_features", OmegaConf.create()), resolve=True))
    cfg.region_features = settings
    malformed = [o for o in overrides if "=" not in o]
    if malformed:
        raise ConfigError(
            f"config {path} is a LazyConfig: its overrides are key=value, not KEY VALUE ({' '.join(malformed)})"
        )
    try:
        LazyConfig.apply_overrides(cfg, overrides)
    except Exception as e:  # hydra's parser and omegaconf raise their own types
        raise ConfigError(f"config overrides {' '.join(overrides)}: {one_line(e)}")
    settings = OmegaConf.to_container(cfg.pop("region_features"), resolve=True)
    unknown = sorted(set(settings) - set(REGION_FEATURES))
    if unknown:
        raise ConfigError(
            f"region_features.{unknown[0]} is not a region-feature setting; known: {', '.join(REGION_FEATURES)}"
        )
    settings = {k: v for k, v in settings.items() if v is not None}
    before = _lazy_flat(cfg)
    head = OmegaConf.select(cfg, "model.roi_heads._target_", default=None)
    try:
        check_region_settings(**{k: v for k, v in settings.items() if k not in ("class_probs", "source_module", "num_attributes", "score_thresh")})
        cfg = enable_region_features(cfg)
        _apply_lazy_settings(cfg.model, settings)
        cfg = enable_region_features(cfg)  # again: the meta-architecture the settings need
    except ValueError as e:
        raise ConfigError(one_line(e).split(": ", 1)[1])
    changes = _changes(before, _lazy_flat(cfg))
    _log_enabling(_flat(head).get("", head) if head is not None else None, changes)
    train = cfg.get("train", OmegaConf.create())
    weights = weights or train.get("init_checkpoint", "")
    device = _device(device, train.get("device", "cuda"))
    if "train" in cfg:
        cfg.train.init_checkpoint, cfg.train.device = weights, device
    identity = copy.deepcopy(cfg)
    if "train" in identity:
        identity.train.init_checkpoint = identity.train.device = ""
    _lazy_test_transform(cfg)  # its errors at load, not at the first image
    return ModelConfig(
        kind=LAZY, path=path, cfg=cfg, text=text, overrides=overrides, resolved=_saved_yaml(cfg),
        sha256=sha256_text(_saved_yaml(identity)), weights=weights, device=device,
        input_format=_lazy_input_format(cfg), changes=changes,
    )


def _apply_lazy_settings(model, settings):
    """Put the ``region_features`` settings into the enabled LazyConfig ``model``."""
    heads = model.roi_heads
    predictor = lazy_box_predictor(heads)
    feature_predictor = is_feature_predictor(predictor)
    for key, value in settings.items():
        if key in _HEAD_KEYS:
            heads[key] = value
        elif key == "score_thresh":
            predictor.test_score_thresh = value
        elif feature_predictor:
            predictor[key] = value
        elif key == "num_attributes":
            raise ValueError(
                f"region_features: region_features.num_attributes needs a stock box predictor to extend; "
                f"{predictor.get('_target_')} is kept as it is"
            )
        else:
            heads.region_selection = dict(heads.get("region_selection") or {}, **{key: value})


def _lazy_input_format(cfg) -> str:
    """The image format of the LazyConfig's test input (its mapper's, else the model's)."""
    from omegaconf import OmegaConf

    image_format = OmegaConf.select(cfg, "dataloader.test.mapper.image_format", default=None)
    return image_format or OmegaConf.select(cfg, "model.input_format", default=None) or get_cfg().INPUT.FORMAT


def _lazy_test_transform(cfg) -> T.Augmentation:
    """The LazyConfig's test augmentations, instantiated (see :meth:`ModelConfig.test_transform`)."""
    from omegaconf import OmegaConf

    augmentations = OmegaConf.select(cfg, "dataloader.test.mapper.augmentations", default=None)
    if augmentations is None:  # detectron2's default test resize
        defaults = get_cfg().INPUT
        return T.ResizeShortestEdge([defaults.MIN_SIZE_TEST] * 2, defaults.MAX_SIZE_TEST)
    try:
        augmentations = [instantiate(copy.deepcopy(a)) for a in augmentations]
    except Exception as e:  # instantiate raises what the target raises
        raise ConfigError(f"dataloader.test.mapper.augmentations: {one_line(e)}")
    return augmentations[0] if len(augmentations) == 1 else AugmentationChain(augmentations)


def _saved_yaml(cfg) -> str:
    """The text ``LazyConfig.save`` writes of ``cfg``."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.yaml")
        LazyConfig.save(cfg, path)
        with open(path) as f:
            return f.read()
