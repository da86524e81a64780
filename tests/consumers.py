"""
The feature readers of vision-and-language codebases, as /work/shared/READERS.md states
them: the same file names, key names, transposes, int() parsing, reshapes and batch
collation as the consumer's own code, written again here (not copied) so that the tests
can run them on our outputs. Each returns ``{image id as the consumer keys it: (features
(N, D) float32, boxes (N, 4) or None)}`` plus what else the consumer derives.
"""
import base64
import csv
import glob
import json
import os
import pickle
import sys

import h5py
import lmdb
import numpy as np
import torch
from torch.utils.data import default_collate

LXMERT_FIELDNAMES = [
    "img_id", "img_h", "img_w", "objects_id", "objects_conf",
    "attrs_id", "attrs_conf", "num_boxes", "boxes", "features",
]
BUTD_FIELDNAMES = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]


def lxmert(path):
    """airsplay/lxmert src/utils.py load_obj_tsv; then the task datasets' default collate."""
    data = []
    csv.field_size_limit(sys.maxsize)
    with open(path) as f:
        for item in csv.DictReader(f, LXMERT_FIELDNAMES, delimiter="\t"):
            for key in ["img_h", "img_w", "num_boxes"]:
                item[key] = int(item[key])
            boxes = item["num_boxes"]
            for key, shape, dtype in [
                ("objects_id", (boxes,), np.int64), ("objects_conf", (boxes,), np.float32),
                ("attrs_id", (boxes,), np.int64), ("attrs_conf", (boxes,), np.float32),
                ("boxes", (boxes, 4), np.float32), ("features", (boxes, -1), np.float32),
            ]:
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
            data.append(item)
    return {item["img_id"]: (item["features"], item["boxes"]) for item in data}, data


def butd_tsv(path):
    """peteanderson80/bottom-up-attention tools/read_tsv.py."""
    out = {}
    csv.field_size_limit(sys.maxsize)
    with open(path) as f:
        for item in csv.DictReader(f, delimiter="\t", fieldnames=BUTD_FIELDNAMES):
            item["image_id"] = int(item["image_id"])
            item["image_h"] = int(item["image_h"])
            item["image_w"] = int(item["image_w"])
            item["num_boxes"] = int(item["num_boxes"])
            for field in ["boxes", "features"]:
                item[field] = np.frombuffer(base64.b64decode(item[field]), dtype=np.float32).reshape(
                    (item["num_boxes"], -1))
            out[item["image_id"]] = (item["features"], item["boxes"])
    return out


def _pad(feat, size):
    """OpenVQA's proc_img_feat."""
    if feat.shape[0] > size:
        feat = feat[:size]
    return np.pad(feat, ((0, size - feat.shape[0]), (0, 0)), mode="constant", constant_values=0)


def _openvqa_bbox(bbox, img_shape):
    """OpenVQA's bbox_proc: normalized x1 y1 x2 y2 and area (N, 5)."""
    feat = np.zeros((bbox.shape[0], 5), dtype=np.float32)
    feat[:, 0] = bbox[:, 0] / float(img_shape[1])
    feat[:, 1] = bbox[:, 1] / float(img_shape[0])
    feat[:, 2] = bbox[:, 2] / float(img_shape[1])
    feat[:, 3] = bbox[:, 3] / float(img_shape[0])
    feat[:, 4] = (bbox[:, 2] - bbox[:, 0]) * (bbox[:, 3] - bbox[:, 1]) / float(img_shape[0] * img_shape[1])
    return feat


def openvqa(folder, pad=100):
    """MILVLG/openvqa vqa_loader.py: ids parsed from names, x transposed, padded; a batch collated."""
    paths = glob.glob(folder + "/*.npz")
    iid_to_path = {str(int(p.split("/")[-1].split("_")[-1].split(".")[0])): p for p in paths}
    out, batch = {}, []
    for iid, path in iid_to_path.items():
        frcn = np.load(path)
        x = frcn["x"].transpose((1, 0))
        n = x.shape[0]
        feat = _pad(x, pad)
        bbox = _pad(_openvqa_bbox(frcn["bbox"], (frcn["image_h"], frcn["image_w"])), pad)
        batch.append((torch.from_numpy(feat), torch.from_numpy(bbox)))
        boxes = bbox[:n, :4] * np.array([frcn["image_w"], frcn["image_h"]] * 2, np.float32)
        out[int(iid)] = (feat[:n], boxes)
    feats, bboxes = default_collate(batch)
    assert feats.shape == (len(paths), pad, x.shape[1]) and bboxes.shape == (len(paths), pad, 5)
    return out


def openvqa_gqa(folder, pad=100):
    """MILVLG/openvqa gqa_loader.py: <imageId>.npz with x (N, D), bbox, width, height."""
    out = {}
    for path in glob.glob(folder + "/*.npz"):
        frcn = np.load(path)
        n = frcn["x"].shape[0]
        feat = _pad(frcn["x"], pad)
        bbox = _pad(_openvqa_bbox(frcn["bbox"], (frcn["height"], frcn["width"])), pad)
        boxes = bbox[:n, :4] * np.array([frcn["width"], frcn["height"]] * 2, np.float32)
        out[os.path.basename(path)[: -len(".npz")]] = (feat[:n], boxes)
    return out


def uniter(folder, conf_th=0.2, max_bb=100, min_bb=10):
    """ChenRocks/UNITER scripts/convert_imgdir.py load_npz (keep_all): 1-D and 2-D arrays only,
    float32 made float16, files that fail reported "corrupted"; then its 7-d norm_bb."""
    out = {}
    for fname in sorted(glob.glob(folder + "/*.npz")):
        img_dump = np.load(fname, allow_pickle=True)
        nbb = min(max_bb, max(min_bb, int((img_dump["conf"] > conf_th).sum())))
        assert nbb >= 0
        dump = {}
        for key, arr in img_dump.items():
            if arr.dtype == np.float32:
                arr = arr.astype(np.float16)
            if arr.ndim not in (1, 2):
                raise ValueError(f"corrupted file {fname}: wrong ndim")
            dump[key] = arr
        norm_bb = torch.from_numpy(dump["norm_bb"]).float()
        norm_bb = torch.cat([norm_bb, norm_bb[:, 4:5] * norm_bb[:, 5:]], dim=-1)
        out[os.path.basename(fname)] = (dump["features"], norm_bb.numpy(), dump["soft_labels"], dump["conf"])
    return out


def mmf(folder, max_loc=100):
    """facebookresearch/mmf feature_readers.py: <id>.npy features and <id>_info.npy dict,
    features padded to max_loc."""
    out = {}
    for path in sorted(glob.glob(folder + "/*.npy")):
        if path.endswith("_info.npy"):
            continue
        info = np.load("{}_info.npy".format(path.split(".npy")[0]), allow_pickle=True).item()
        features = np.load(path, allow_pickle=True)
        image_loc, image_dim = features.shape
        padded = np.zeros((max_loc, image_dim), dtype=np.float32)
        padded[:image_loc] = features[:max_loc]
        assert info["num_boxes"] == image_loc and info["bbox"].shape == (image_loc, 4)
        out[info["image_id"]] = (padded[:image_loc], info["bbox"], info)
    return out


def vilbert(folder, lmdb_path, dim):
    """vilbert-multi-task script/convert_to_lmdb.py (the npy folder to an LMDB of pickles), then
    _image_features_reader's decoding (its 2048 made ``dim``): the global mean feature first."""
    infiles = glob.glob(os.path.join(folder, "*"))
    env = lmdb.open(lmdb_path, map_size=1 << 30)
    id_list = []
    with env.begin(write=True) as txn:
        for infile in infiles:
            reader = np.load(infile, allow_pickle=True)
            item = {"image_id": reader.item().get("image_id")}
            img_id = str(item["image_id"]).encode()
            id_list.append(img_id)
            item["image_h"] = reader.item().get("image_height")
            item["image_w"] = reader.item().get("image_width")
            item["num_boxes"] = reader.item().get("num_boxes")
            item["boxes"] = base64.b64encode(reader.item().get("bbox"))
            item["features"] = base64.b64encode(reader.item().get("features"))
            txn.put(img_id, pickle.dumps(item))
        txn.put("keys".encode(), pickle.dumps(id_list))
    out = {}
    with env.begin(write=False) as txn:
        for image_id in pickle.loads(txn.get(b"keys")):
            item = pickle.loads(txn.get(image_id))
            num_boxes = int(item["num_boxes"])
            image_h, image_w = int(item["image_h"]), int(item["image_w"])
            features = np.frombuffer(base64.b64decode(item["features"]), dtype=np.float32).reshape(-1, dim)
            boxes = np.frombuffer(base64.b64decode(item["boxes"]), dtype=np.float32).reshape(-1, 4)
            g_feat = np.sum(features, axis=0) / num_boxes
            features = np.concatenate([np.expand_dims(g_feat, axis=0), features], axis=0)
            assert np.isfinite(features).all()
            location = np.zeros((boxes.shape[0], 5), dtype=np.float32)
            location[:, :4] = boxes
            location[:, 4] = (location[:, 3] - location[:, 1]) * (location[:, 2] - location[:, 0]) / (
                float(image_w) * float(image_h))
            location[:, (0, 2)] /= float(image_w)
            location[:, (1, 3)] /= float(image_h)
            out[int(item["image_id"])] = (features[1:], location[:, :4] * np.array([image_w, image_h] * 2, np.float32))
    env.close()
    return out


def ban(folder):
    """jnhwkim/ban-vqa dataset.py (adaptive: pos_boxes) or hengyuan-hu's (fixed N)."""
    out = {}
    for h5_path in glob.glob(folder + "/*.hdf5"):
        with open(h5_path[: -len(".hdf5")] + "_imgid2idx.pkl", "rb") as f:
            img_id2idx = pickle.load(f)
        with h5py.File(h5_path, "r") as hf:
            features = np.array(hf.get("image_features"))
            spatials = np.array(hf.get("spatial_features"))
            bb = np.array(hf.get("image_bb"))
            adaptive = "pos_boxes" in hf
            pos_boxes = np.array(hf.get("pos_boxes")) if adaptive else None
        batch = []
        for image_id, idx in img_id2idx.items():
            if adaptive:
                begin, end = pos_boxes[idx]
                item = (features[begin:end, :], spatials[begin:end, :], bb[begin:end, :])
            else:
                item = (features[idx], spatials[idx], bb[idx])
                batch.append(torch.from_numpy(item[0]))
            out[image_id] = (item[0], item[2], item[1])
        if not adaptive:
            assert default_collate(batch).shape == features.shape
    return out


class TSVFile:
    """microsoft/Oscar's TSVFile: lines found through the .lineidx offsets."""

    def __init__(self, path):
        self.path = path
        with open(os.path.splitext(path)[0] + ".lineidx") as f:
            self.lineidx = [int(i.strip()) for i in f.readlines()]
        self.fp = open(path, "r")

    def __len__(self):
        return len(self.lineidx)

    def seek(self, idx):
        self.fp.seek(self.lineidx[idx])
        return [s.strip() for s in self.fp.readline().split("\t")]


def oscar(folder):
    """microsoft/Oscar run_captioning.py: features (with spatial6) and labels through TSVFile."""
    features_tsv, labels_tsv = TSVFile(folder + "/features.tsv"), TSVFile(folder + "/labels.tsv")
    out = {}
    for i in range(len(features_tsv)):
        row = features_tsv.seek(i)
        feat_info = json.loads(row[1])
        num_boxes = feat_info["num_boxes"]
        features = np.frombuffer(base64.b64decode(feat_info["features"]), np.float32).reshape((num_boxes, -1))
        label_row = labels_tsv.seek(i)
        assert label_row[0] == row[0]
        labels = json.loads(label_row[1])
        od_labels = " ".join([l["class"] for l in labels])
        rects = np.array([l["rect"] for l in labels], np.float32).reshape(-1, 4)
        out[row[0]] = (features[:, :-6], rects, features[:, -6:], od_labels)
    return out


def visualbert(folder, names):
    """uclanlp/visualbert vqa_dataset.py: one <COCO file stem>.npy per image."""
    return {name: (np.load(os.path.join(folder, name + ".npy")), None) for name in names}
