"""UCF101 as CoOp reads it: one middle frame per video (`UCF-101-midframes/`), the `ucfTrainTestlist` split.

The frames are CoOp's (`UCF-101-midframes.zip`): `ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi` of the
lists is the frame `Apply_Eye_Makeup/v_ApplyEyeMakeup_g08_c01.jpg`, the action's words joined by `_`.
"""

from __future__ import annotations

from pathlib import Path

from fgvr.data import Sample
from fgvr.datasets import _layout as L
from fgvr.datasets._layout import CoopSplit, DatasetInfo, ReadOptions, Splits


def read_ucf101(info: DatasetInfo, root: Path | None, options: ReadOptions) -> Splits:
    fold = L.fold_number(info, options)
    base = L.locate(info, root, "UCF-101-midframes")
    frames = base / "UCF-101-midframes"
    lists = L.first(base, "ucfTrainTestlist", "UCF101TrainTestSplits-RecognitionTask/ucfTrainTestlist")
    if lists is None:
        raise L.layout_error(info, f"{base / 'ucfTrainTestlist'} not found (UCF101TrainTestSplits-RecognitionTask.zip)")
    actions = {a: L.camel_words(a) for _, a in L.read_lines(info, lists / "classInd.txt", 2)}
    L.unique_names(info, actions, "classInd.txt")
    parts = {}
    for part in ("train", "test"):
        file = f"{part}list{fold:02d}.txt"
        samples = []
        for n, line in enumerate(L.read_names(info, lists / file), 1):
            action, _, video = line.split()[0].partition("/")
            if action not in actions:
                raise L.layout_error(info, f"{file}, line {n}: action {action!r} is not in classInd.txt")
            frame = frames / actions[action].replace(" ", "_") / (Path(video).stem + ".jpg")
            samples.append(Sample(frame, actions[action]))
        parts[part] = samples
    return L.make_splits(info, base, parts["train"], parts["test"], actions.values(),
                         f"ucfTrainTestlist/trainlist{fold:02d}.txt", f"ucfTrainTestlist/testlist{fold:02d}.txt",
                         split=f"official, fold {fold}")


DATASET = DatasetInfo(
    name="ucf101", aliases=("ucf-101", "ucf"), title="UCF101 (middle frames)", classes=101, order=12,
    page="https://www.crcv.ucf.edu/data/UCF101.php",
    archives="UCF101TrainTestSplits-RecognitionTask.zip; the frames: CoOp's UCF-101-midframes.zip",
    layout=("  ucf101/\n    UCF-101-midframes/Apply_Eye_Makeup/v_ApplyEyeMakeup_g08_c01.jpg ...\n"
            "    ucfTrainTestlist/classInd.txt  trainlist01.txt  testlist01.txt  ... (folds 01-03)\n"
            "    split_zhou_UCF101.json   (for --split coop)"),
    files="`UCF-101-midframes/`, `ucfTrainTestlist/classInd.txt`, `trainlist<NN>.txt`, `testlist<NN>.txt` (`--fold N`, 1-3)",
    class_names="`classInd.txt`, words split (`Apply Eye Makeup`)",
    split="`trainlist01` / `testlist01`: 9,537 / 3,783 videos, one frame each", folders=("ucf101", "UCF101"),
    reader=read_ucf101, coop=CoopSplit("split_zhou_UCF101.json", "UCF-101-midframes"), folds=3,
)
